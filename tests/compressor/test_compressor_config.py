"""Bad compressor configs fail with the field, the value and the fix."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from slimtrain.modules.compressor import CompressorModelConfig, TruncatedEncoder, encoder_model_config
from slimtrain.modules.transformer import ModelConfig

TRUNCATE = {"source": "truncate", "layers": 2}
SEPARATE = {"source": "separate", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


def _error(**fields: Any) -> str:
    with pytest.raises(ValidationError) as err:
        CompressorModelConfig(**{"encoder": TRUNCATE, **fields})
    return str(err.value)


@pytest.mark.parametrize("fields, expected", [
    ({"pooling_factor": 0}, r"pooling_factor\n.*pooling_factor=0 must be >= 1"),
    ({"pooling_factor": -8}, r"pooling_factor=-8 must be >= 1 \(tokens per compressed vector"),
    ({"vectors_per_span": 0}, r"vectors_per_span=0 must be >= 1"),
    ({"pooled_layers": -1}, r"pooled_layers=-1 must be >= 0"),
    ({"pooled_layers": 3}, r"pooled_layers=3 exceeds the encoder's 2 layers; lower pooled_layers to at most 2"),
    ({"pooling": "memory", "num_memory_tokens": 0}, r"num_memory_tokens=0 must be >= 1"),
    ({"projector_bottleneck": 0}, r"projector_bottleneck=0 must be >= 1"),
    ({"pooling_factor": 4, "vectors_per_span": 8}, r"pooling_factor=4 and vectors_per_span=8 are both set; keep one"),
    ({"pooling": "memory", "pooling_factor": 4}, r"pooling_factor applies to pooling 'mean'.*remove pooling_factor"),
    ({"num_memory_tokens": 8}, r"num_memory_tokens applies to pooling 'memory'"),
    ({"pooling": "max"}, r"pooling\n.*'mean' or 'memory'"),
    ({"pooling_factor": 4, "pool_factor": 2}, r"pool_factor\n.*Extra inputs are not permitted"),
])
def test_bad_values_name_the_field_the_value_and_the_fix(fields: dict, expected: str) -> None:
    assert re.search(expected, _error(**fields)), _error(**fields)


@pytest.mark.parametrize("encoder, expected", [
    ({"source": "truncate", "layers": -1}, r"encoder.layers=-1 must be >= 0"),
    ({"source": "copy", "layers": 1}, r"encoder\n.*'truncate', 'separate'"),
    ({**SEPARATE, "num_kv_heads": 3}, r"encoder.num_kv_heads=3 must divide encoder.num_heads=4; choose one of "
     r"\[1, 2, 4\]"),
    ({**SEPARATE, "hidden_size": 30}, r"encoder.hidden_size=30 is not divisible by encoder.num_heads=4"),
    ({**SEPARATE, "layers": 2}, r"encoder.separate.layers\n.*Extra inputs"),  # `layers` is truncate's key
    ({"source": "truncate", "layers": 2, "hidden_size": 64}, r"hidden_size\n.*Extra inputs"),
])
def test_bad_encoders_name_the_field(encoder: dict, expected: str) -> None:
    message = _error(encoder=encoder, pooled_layers=0)
    assert re.search(expected, message), message


def test_defaults_are_arc_like() -> None:
    cfg = CompressorModelConfig(encoder=TRUNCATE)
    assert (cfg.pooling, cfg.factor, cfg.pooled_layers, cfg.final_norm) == ("mean", 4, 1, True)
    assert isinstance(cfg.encoder, TruncatedEncoder) and cfg.encoder.init == "decoder"
    assert CompressorModelConfig(encoder=TRUNCATE, vectors_per_span=16).factor is None
    assert CompressorModelConfig(encoder=TRUNCATE, pooling="memory").num_memory_tokens == 32


def test_encoder_model_config_follows_the_decoder() -> None:
    decoder = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
    truncated = encoder_model_config(CompressorModelConfig(encoder=TRUNCATE), decoder)
    assert truncated.model_dump() == {**decoder.model_dump(), "num_layers": 2}
    separate = encoder_model_config(CompressorModelConfig(encoder={**SEPARATE, "hidden_size": 48}), decoder)
    assert (separate.vocab_size, separate.hidden_size, separate.num_layers) == (64, 48, 2)
    with pytest.raises(ValueError, match="vocab_size is not resolved"):
        encoder_model_config(CompressorModelConfig(encoder=TRUNCATE), decoder.model_copy(update={"vocab_size": None}))
