"""What each Hugging Face family computes, as rules on `ModelConfig`: an option a family's class cannot compute is
refused when the recipe is read, naming the option and the fix, rather than lost at export.

    llama    LlamaForCausalLM (Llama 2/3.x, SmolLM 1/2): attention_bias puts biases on q, k, v and o alike;
             mlp_bias; no q/k norm; no sliding window
    mistral  MistralForCausalLM: no biases, no q/k norm; a sliding window on every layer or none
    qwen2    Qwen2ForCausalLM: q/k/v biases always, none on o; sliding window on the layers from max_window_layers
    qwen3    Qwen3ForCausalLM: q/k RMSNorm always; attention_bias on q, k, v and o; sliding window as Qwen2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig


def family_errors(cfg: "ModelConfig") -> list[str]:
    """One line per option of `cfg` that its `architecture`'s class does not compute, each with the fix."""
    arch, wrong = cfg.architecture, []
    qk_norm = arch == "qwen3"
    if cfg.qk_norm != qk_norm:
        wrong.append(f"model.qk_norm={cfg.qk_norm} but {arch}'s class {'always has' if qk_norm else 'has no'} q/k "
                     f"norms; set qk_norm: {str(qk_norm).lower()}"
                     + ("" if qk_norm else " (or architecture: qwen3)"))
    if arch == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
        wrong.append(f"model.qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias} but Qwen2's class has q/k/v biases and "
                     "none on o; set qkv_bias: true, o_bias: false")
    if arch in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        wrong.append(f"model.qkv_bias={cfg.qkv_bias} but o_bias={cfg.o_bias}: {arch}'s attention_bias puts biases on "
                     "q, k, v and o alike; set both equal (or architecture: qwen2 for q/k/v biases alone)")
    if arch in ("mistral", "qwen2") and cfg.o_bias:
        wrong.append(f"model.o_bias=true but {arch}'s class has no bias on o; set o_bias: false")
    if arch == "mistral" and cfg.qkv_bias:
        wrong.append("model.qkv_bias=true but Mistral's class has no attention biases; set qkv_bias: false "
                     "(or architecture: qwen2)")
    if arch != "llama" and cfg.mlp_bias:
        wrong.append(f"model.mlp_bias=true but {arch}'s class has no MLP biases; set mlp_bias: false "
                     "(or architecture: llama)")
    return wrong + _window_errors(cfg)


def _window_errors(cfg: "ModelConfig") -> list[str]:
    arch, layers = cfg.architecture, cfg.sliding_window_layers
    if cfg.sliding_window is None:
        return []
    if arch == "llama":
        return [f"model.sliding_window={cfg.sliding_window} but LlamaForCausalLM has no sliding window; set "
                "architecture: mistral (every layer) or qwen2/qwen3 (the last layers), or sliding_window: null"]
    if arch == "mistral" and layers is not None and sorted(set(layers)) != list(range(cfg.num_layers)):
        return [f"model.sliding_window_layers={layers} but Mistral's class slides on every layer; set "
                "sliding_window_layers: null (or architecture: qwen2/qwen3 for the last layers only)"]
    if arch in ("qwen2", "qwen3") and layers is not None and layers:
        first = min(layers)
        if sorted(set(layers)) != list(range(first, cfg.num_layers)):
            return [f"model.sliding_window_layers={layers} but {arch}'s class slides on the layers from "
                    f"max_window_layers to the last; give a run of layers that ends at {cfg.num_layers - 1}"]
    return []


def max_window_layers(cfg: "ModelConfig") -> int:
    """Qwen's max_window_layers for `cfg`: the first sliding layer (the layer count when none slides)."""
    if cfg.sliding_window is None:
        return cfg.num_layers
    layers = cfg.sliding_window_layers
    return 0 if layers is None else (min(layers) if layers else cfg.num_layers)
