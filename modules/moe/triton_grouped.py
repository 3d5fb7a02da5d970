"""Grouped GEMM in Triton, for where torch's `grouped_mm` cannot run: older torch, inner dimensions that are not
16-byte aligned, dtypes torch's kernel lacks on the device. Same contract as
`torch.nn.functional.grouped_mm(a, b, offs=offs)` for a 2-D `a` [T, K] and a 3-D `b` [E, K, N]: rows
offs[g-1]:offs[g] of `a` are multiplied by b[g], rows past offs[-1] give zeros; fp32 accumulation, output in
a's dtype; differentiable (dA and dB both by Triton kernels).

Forward and dA: one program per (row tile, column tile). Row tiles never straddle two groups: each group's
rows are cut into tiles from its own start, and a tile -> (group, first row, row end) table is built on the
device with torch ops, its length an upper bound (T / BLOCK_M + E + 1) so no host sync is needed; programs
past the last real tile return at once. The rows past offs[-1] form one more "group" whose tiles store zeros.
dB: one program per (group, K tile, N tile), looping over that group's rows.

The kernels are plain functions, jitted on first use, so the module imports without triton. On CPU they run
under Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is first imported (triton jits
its own library functions then): tests run them in a subprocess started with it.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # optional: the module imports without triton, and `triton_available` then says no
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x`: triton imports, and x is on CUDA (or on CPU with
    TRITON_INTERPRET=1, Triton's interpreter)."""
    if triton is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpret())


def triton_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [T, K] x b [E, K, N] per group of rows (int `offs` [E]: cumulative row ends) -> [T, N] in a's dtype.

    `b` may be any strided view (e.g. `weight.transpose(1, 2)`); groups may be empty."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1] or offs.shape != (b.shape[0],):
        raise ValueError(f"grouped_mm: a {tuple(a.shape)}, b {tuple(b.shape)}, offs {tuple(offs.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"grouped_mm: a is {a.dtype}, b is {b.dtype}")
    return _GroupedMM.apply(a, b, offs)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offs)
        return _forward(a, b, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b, offs = ctx.saved_tensors
        da = _forward(dy, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        db = _weight_grad(a, dy, offs, b.dtype) if ctx.needs_input_grad[1] else None
        return da, db, None


def _interpret() -> bool:
    """Whether Triton's interpreter is asked for (parsed as triton parses it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "on", "yes"}


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16; powers of two keep tl.arange legal
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own TF32 switch, so this path rounds as torch.matmul would
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _widen(dtype: torch.dtype) -> bool:
    """Whether to run bf16 in fp32: Triton's interpreter (3.9) multiplies bf16 tl.dot operands as their raw
    uint16 bits and rounds fp32 -> bf16 wrongly, so there the kernels widen bf16 operands to fp32 (exact, as
    bf16 products are) and store fp32, which torch then rounds to bf16."""
    return dtype == torch.bfloat16 and _interpret()


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """(forward kernel, dB kernel): triton.jit makes interpreted functions when TRITON_INTERPRET is set."""
    del interpret  # only the cache key: one pair per mode
    return triton.jit(_grouped_mm_kernel), triton.jit(_weight_grad_kernel)


def _tile_table(offs: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row tile: group (E: the zero tail past offs[-1]; E + 1: no tile), first row, row end (int32)."""
    ends = torch.cat([offs.long(), offs.new_full((1,), rows, dtype=torch.long)])  # the tail ends at T
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts).clamp_min(0).add(block_m - 1).div(block_m, rounding_mode="floor")
    last_tile = tiles.cumsum(0)
    index = torch.arange(triton.cdiv(rows, block_m) + len(ends), device=offs.device)
    group = torch.searchsorted(last_tile, index, right=True)
    g = group.clamp(max=len(ends) - 1)
    first = starts[g] + (index - (last_tile - tiles)[g]) * block_m
    return group.to(torch.int32), first.to(torch.int32), ends[g].to(torch.int32)


def _forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped product a [T, K] x b [E, K, N] -> [T, N]; also dA, as dY x b^T."""
    (rows, k), (groups, _, n) = a.shape, b.shape
    widen = _widen(a.dtype)
    out = a.new_empty(rows, n, dtype=torch.float32 if widen else a.dtype)
    if rows == 0 or n == 0:
        return out.to(a.dtype)
    bm, bn, bk = _block(rows // max(groups, 1), 64), _block(n, 64), _block(k, 32)
    group, first, end = _tile_table(offs, rows, bm)
    kernel, _ = _kernels(_interpret())
    grid = (len(group), triton.cdiv(n, bn))
    kernel[grid](a, b, out, group, first, end, groups, n, k, a.stride(0), a.stride(1), b.stride(0),
                 b.stride(1), b.stride(2), out.stride(0), out.stride(1),
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(a.dtype), UPCAST=widen)
    return out.to(a.dtype)


def _weight_grad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dB [E, K, N] = a_g^T dy_g per group (zero for an empty group)."""
    (rows, k), (groups, n) = a.shape, (offs.shape[0], dy.shape[1])
    widen = _widen(a.dtype)
    db = a.new_empty(groups, k, n, dtype=torch.float32 if widen else dtype)
    if db.numel() == 0:
        return db.to(dtype)
    bm, bk, bn = _block(rows // max(groups, 1), 64), _block(k, 64), _block(n, 64)
    _, kernel = _kernels(_interpret())
    grid = (groups, triton.cdiv(k, bk), triton.cdiv(n, bn))
    kernel[grid](a, dy, db, offs, k, n, a.stride(0), a.stride(1), dy.stride(0), dy.stride(1),
                 db.stride(0), db.stride(1), db.stride(2),
                 BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, PRECISION=_precision(a.dtype), UPCAST=widen)
    return db.to(dtype)


def _grouped_mm_kernel(a_ptr, b_ptr, out_ptr, group_ptr, first_ptr, end_ptr, groups, n, k,
                       s_am, s_ak, s_be, s_bk, s_bn, s_om, s_on,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of out = a_g b[g], its rows and group from the tile table."""
    tile = tl.program_id(0)
    group = tl.load(group_ptr + tile)
    if group > groups:  # past the last real tile: the grid is an upper bound
        return
    rows = tl.load(first_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < tl.load(end_ptr + tile), cols < n
    rows64 = rows.to(tl.int64)  # T * K may pass 2**31 elements
    b_base = b_ptr + group.to(tl.int64) * s_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(group < groups, k, 0)  # the tail past offs[-1] multiplies nothing: it stores zeros
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows64[:, None] * s_am + ks[None, :] * s_ak,
                    mask=row_ok[:, None] & (ks[None, :] < k), other=0.0)
        b = tl.load(b_base + ks[:, None] * s_bk + cols[None, :] * s_bn,
                    mask=(ks[:, None] < k) & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows64[:, None] * s_om + cols[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _weight_grad_kernel(a_ptr, dy_ptr, db_ptr, offs_ptr, k, n, s_am, s_ak, s_ym, s_yn, s_de, s_dk, s_dn,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] tile of dB[g] = a_g^T dy_g, summed over the group's rows."""
    group = tl.program_id(0)
    start = tl.load(offs_ptr + group - 1, mask=group > 0, other=0).to(tl.int64)
    end = tl.load(offs_ptr + group).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, col_ok = ks < k, cols < n
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):  # an empty group never enters: its gradient stays zero
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_t = tl.load(a_ptr + rows[None, :] * s_am + ks[:, None] * s_ak,  # a_g^T tile [BLOCK_K, BLOCK_M]
                      mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a_t, dy = a_t.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(a_t, dy, acc, input_precision=PRECISION)
    tl.store(db_ptr + group.to(tl.int64) * s_de + ks[:, None] * s_dk + cols[None, :] * s_dn,
             acc.to(db_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])
