"""Where a profiled step's time goes, by kind of work: matrix products, attention, fused (compiled)
kernels, elementwise, reductions, copies and casts, optimizer, communication, the rest.

On a GPU the sum is over the device kernels the profiler saw (each kernel once, by its name); on CPU
over the operators' self time. The kinds are matched in order, first match wins, on lower-cased names.
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS: list[tuple[str, str]] = [
    ("attention", r"^triton_tem_\w*(flex|attention)"),  # flex attention's kernels are Triton templates
    ("fused (compiled)", r"^triton_|compiledfunction|compiledfxgraph|compiled region|inductor|cpp_fused"),
    ("attention", r"flash|fmha|attention|attn|cudnn_.*(fprop|bprop|sdpa)|flex"),
    ("matmul", r"gemm|gemv|xmma|cutlass|nvjet|sm90_|sm80_|ampere_|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("communication", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather|broadcast|gloo"),
    ("reduction", r"foreach_norm|reduce|sum|norm|softmax|max|mean|nll|cross_entropy|logsumexp"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("views, allocation, autograd", r"autograd::|backward0|dynamo|aten::(view|view_as|t|transpose|as_strided|empty|"
     r"empty_strided|slice|reshape|_unsafe_view|narrow|expand|expand_as|detach|alias|split|unbind|select|squeeze|"
     r"unsqueeze|permute)$"),
    ("copy / cast", r"copy|cast|_to_copy|memcpy|memset|fill|cat\b|clone|contiguous"),
    ("embedding / indexing", r"embedding|index|gather|scatter|sort|radix"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|div|silu|sigmoid|\bexp\b|exp_|pow|sqrt|lerp|where|neg|sub"),
]


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator name stands for ('other' when no pattern matches)."""
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def time_by_kind(prof) -> dict[str, float]:
    """Seconds per kind in a finished `torch.profiler.profile`: device kernels' busy time when there are
    any (idle gaps not counted; kernels overlapping on two streams both counted), else CPU operators'
    self time (each event once, so the kinds add up to the profiled CPU time)."""
    events = list(prof.events())
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    out: dict[str, float] = defaultdict(float)
    if kernels:
        for e in kernels:
            # a kernel's own duration (older torch spells device_time_total cuda_time_total)
            out[kind_of(e.name)] += (getattr(e, "device_time_total", None) or e.cuda_time_total) / 1e6
    else:
        for e in events:
            out[kind_of(e.name)] += e.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def format_kinds(by_contender: dict[str, dict[str, float]]) -> str:
    """A table: one row per kind, one column of seconds per contender, largest first."""
    names = list(by_contender)
    kinds = sorted({k for d in by_contender.values() for k in d},
                   key=lambda k: -max(d.get(k, 0.0) for d in by_contender.values()))
    w = max(len(k) for k in [*kinds, "kind"]) + 2
    lines = [f"{'kind':{w}}" + "".join(f"{n:>12}" for n in names)]
    for k in kinds:
        lines.append(f"{k:{w}}" + "".join(f"{by_contender[n].get(k, 0.0):12.3f}" for n in names))
    lines.append(f"{'total':{w}}" + "".join(f"{sum(by_contender[n].values()):12.3f}" for n in names))
    return "\n".join(lines)
