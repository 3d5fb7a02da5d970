"""Load an exported directory with `transformers` and compare its logits with our model's."""

from __future__ import annotations

from pathlib import Path

import torch

from slimtrain.modules.transformer.config import ModelConfig

TOLERANCE = 1e-4


@torch.no_grad()
def compare_logits(out_dir: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, seq_len: int = 32,
                   batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> float:
    """Max |logit difference| between our model and the HF load of `out_dir`, both computing in fp32.

    `dtype`: what the export stored. Our model gets the weights rounded the same way, so that a bf16 or
    fp16 export is held to the same tolerance as an fp32 one (a wrong name or layout still shows)."""
    from transformers import AutoModelForCausalLM

    from slimtrain.modules.transformer import Transformer

    ours = Transformer(cfg.model_copy(update={"attention": "eager"}))
    ours.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v for k, v in state.items()},
                         strict=not cfg.tie_embeddings)
    ours.eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager")
    theirs.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, min(seq_len, cfg.max_seq_len)), generator=g)
    return float((ours(ids).logits - theirs(input_ids=ids).logits).abs().max())


def generate_text(out_dir: Path, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy completion of `prompt` by `transformers` from the exported directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
