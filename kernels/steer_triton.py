"""The steer op h' = h + ((h @ down) * row_values[:, col_dim]) @ up as Triton kernels.

Design: two launches, deterministic, no host synchronisation.

1. `_shrink_kernel`, grid (row blocks, R blocks, K splits): each program computes one
   [BLOCK_M, BLOCK_R] tile of h @ down over its share of D, multiplies it by the per-row,
   per-column value row_values[b, col_dim[c]] and writes it to an fp32 scratch
   part[split, B, R]. Every program writes its whole tile (zeros where skipped), so the
   scratch needs no memset launch.
2. `_expand_kernel`, grid (row blocks, D blocks): sums the K splits of the scratch in a fixed
   order, multiplies by up, adds the residual h and writes the output row in h's dtype.

Why two launches and not one: every output column needs the complete shrink over all of D for
all R columns first. One launch would need either a grid-wide barrier (not available in
Triton without a cooperative launch), atomics into an fp32 [B, D] accumulator (results then
differ from run to run, and the accumulator still needs a zeroing launch and a cast/residual
epilogue launch), or each expand program recomputing the shrink (reading down D/BLOCK_D
times). Two launches keep the result bit-reproducible and read down and up once each.
The split over D in the shrink (used when the grid would otherwise be too small to fill the
GPU, i.e. small R) writes separate partial buffers rather than using atomics for the same
reason: the expand adds them in a fixed order.

Skipping: a row whose row_values are all zero is "unsteered": the expand kernel computes a
per-row flag from row_values in-kernel and stores h itself for such rows (bit-identical,
also when h holds -0.0 or when up holds inf/NaN). A whole tile of weights is skipped (its
loads masked off, so no memory traffic) when no row of the block uses it: in the shrink when
every row_values[b, col_dim[c]] of the tile is zero, in the expand when the block's scratch
chunk is zero. Skipping is done by masks rather than `if`, so Triton's load pipelining stays
intact and there is no branching on tensor data on the host. (Where weights are skipped, an
inf/NaN in them does not reach the output, unlike 0 * inf in torch; finite weights agree.)

Precision: fp32 accumulation throughout. The shrink uses the tensor-core dot when h and down
share a 16-bit dtype (the products of two 16-bit floats are exact in fp32), an fp32 "ieee"
dot otherwise. The expand's left operand is the fp32 scratch: with bf16 `up` it is split
into hi + lo bf16 parts and multiplied with two tensor-core dots (about 16 significant bits,
far below the bf16/fp16 output rounding); with fp16 or fp32 `up` (or fp32 output) it uses
an fp32 "ieee" dot (fp16 could overflow for the hi part, fp32 output wants full precision).

Memory: the scratch is split_k * B * R * 4 bytes from torch's caching allocator (no host
sync, capturable in CUDA graphs). At decode the expand has only cdiv(D, BLOCK_D) programs;
the tile sizes come from `_pick_config`, a heuristic that benchmarks/kernel_bench.py's sweep
is there to retune. If that sweep shows the expand starving the GPU of bandwidth, the next
step is a split over R with a small third launch that adds the partial outputs in order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["steer_hidden_triton"]

_HALF = (torch.bfloat16, torch.float16)


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. FP32: both operands in fp32 with full-precision products. UPCAST: same
    maths as the 16-bit tensor-core dot but done in fp32 (the interpreter cannot multiply
    bf16: it would multiply the raw bits); the 16-bit products are exact in fp32 either way."""
    if FP32 or UPCAST:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        res = tl.dot(a, b, acc)
    return res


@triton.jit
def _shrink_kernel(
    h_ptr, down_ptr, col_dim_ptr, vals_ptr, part_ptr,
    B, D, R, d_per_split,
    stride_hb, stride_hd, stride_dd, stride_dr, stride_vb, stride_vk,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST: tl.constexpr,
):
    """part[split, rows, cols] = (h[rows, Dsplit] @ down[Dsplit, cols]) * vals[rows, col_dim[cols]]."""
    pid_m = tl.program_id(0)  # fastest axis: programs sharing a down tile run together (L2 reuse)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    cmask = cols < R
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    dims = tl.load(col_dim_ptr + cols, mask=cmask, other=0).to(tl.int64)
    scale = tl.load(vals_ptr + rows64[:, None] * stride_vb + dims[None, :] * stride_vk,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    # Tile skip: no row of this block steers any column of it. Folded into the D bound (a
    # scalar int, not a bool: the interpreter mis-broadcasts scalar bools) so the loads of
    # h and down are masked off and cost no memory traffic.
    used = (tl.sum((scale != 0).to(tl.int32)) > 0).to(tl.int32)
    d_lim = D * used

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    d_start = pid_s * d_per_split
    for k0 in range(d_start, d_start + d_per_split, BLOCK_K):
        ks = k0 + offs_k
        kmask = ks < d_lim
        ks64 = ks.to(tl.int64)
        h = tl.load(h_ptr + rows64[:, None] * stride_hb + ks64[None, :] * stride_hd,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(down_ptr + ks64[:, None] * stride_dd + cols64[None, :] * stride_dr,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(h, w, acc, FP32_DOT, UPCAST)

    acc = acc * scale
    out = part_ptr + pid_s.to(tl.int64) * B * R + rows64[:, None] * R + cols64[None, :]
    tl.store(out, acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, up_ptr, vals_ptr, part_ptr, out_ptr,
    B, D, R, KTOT,
    stride_hb, stride_hd, stride_ur, stride_ud, stride_vb, stride_vk, stride_ob, stride_od,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_KT: tl.constexpr, HILO: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[rows, dcols] = h + sum_splits(part)[rows, :] @ up[:, dcols] for steered rows, h for the others."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dcols < D
    rows64 = rows.to(tl.int64)
    dcols64 = dcols.to(tl.int64)

    # Per-row "steered" flag: any of the row's KTOT values non-zero (NaN counts as non-zero).
    kt = tl.arange(0, BLOCK_KT)
    vals = tl.load(vals_ptr + rows64[:, None] * stride_vb + kt[None, :] * stride_vk,
                   mask=rmask[:, None] & (kt < KTOT)[None, :], other=0.0)
    steered = tl.sum((vals != 0).to(tl.int32), axis=1) > 0

    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        cols = r0 + offs_r
        cmask = cols < R
        cols64 = cols.to(tl.int64)
        a_ptrs = part_ptr + rows64[:, None] * R + cols64[None, :]
        a_mask = rmask[:, None] & cmask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):  # fixed order: deterministic
            a += tl.load(a_ptrs + s * B * R, mask=a_mask, other=0.0)
        a = tl.where(steered[:, None], a, 0.0)
        # Chunk skip: no steered row of this block has a non-zero coefficient here, so the
        # up rows are not read (masked load, see _shrink_kernel for the int bound).
        r_lim = R * (tl.sum((a != 0).to(tl.int32)) > 0).to(tl.int32)
        w = tl.load(up_ptr + cols64[:, None] * stride_ur + dcols64[None, :] * stride_ud,
                    mask=(cols < r_lim)[:, None] & dmask[None, :], other=0.0)
        if HILO:
            a_hi = a.to(w.dtype)
            a_lo = (a - a_hi.to(tl.float32)).to(w.dtype)
            acc = _dot(a_hi, w, acc, False, UPCAST)
            acc = _dot(a_lo, w, acc, False, UPCAST)
        else:
            acc = _dot(a, w, acc, True, UPCAST)

    omask = rmask[:, None] & dmask[None, :]
    h = tl.load(h_ptr + rows64[:, None] * stride_hb + dcols64[None, :] * stride_hd, mask=omask, other=0.0)
    res = (h.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
    res = tl.where(steered[:, None], res, h.to(out_ptr.dtype.element_ty))  # unsteered rows: h, bit for bit
    tl.store(out_ptr + rows64[:, None] * stride_ob + dcols64[None, :] * stride_od, res, mask=omask)


@dataclass(frozen=True)
class _Config:
    """Launch shape. Chosen from the (host-known) sizes only, never from tensor contents."""

    block_m: int
    shrink_block_r: int
    block_k: int
    split_k: int
    block_d: int
    expand_block_r: int
    num_warps: int = 4
    num_stages: int = 3  # upper bound; lowered where a stage's tiles would not fit _SMEM_BUDGET


_SMEM_BUDGET = 96 * 1024  # bytes of shared memory for the pipelined tiles (fits A100/H100/H200)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_config(b: int, d: int, r: int, num_sms: int) -> _Config:
    """Heuristic tiles (untuned guesses until the benchmark's sweep says otherwise). Decode
    (small B) is memory-bound on reading down and up, so the goal is enough programs, each
    with enough bytes in flight, to keep every SM streaming: split D in the shrink when there
    are too few R blocks, narrow the D blocks of the expand when there are too few of them and
    give it long R chunks. Larger B is compute-bound: wider tiles reuse each weight tile."""
    block_m = 16 if b <= 16 else 32 if b <= 32 else 64
    m_blocks = triton.cdiv(b, block_m)
    shrink_block_r = 32 if r <= 32 else 64
    block_k = 64 if d <= 64 else 128
    k_chunks = triton.cdiv(d, block_k)
    base = m_blocks * triton.cdiv(r, shrink_block_r)
    small = b <= 16
    expand_block_r = 128 if small else 64
    # The expand loads every split's [block_m, expand_block_r] fp32 chunk per pipeline stage:
    # keep those at 32 KiB or less.
    max_split = max(1, 32768 // (block_m * expand_block_r * 4))
    split_k = max(1, min(triton.cdiv(2 * num_sms, base), k_chunks // 2, max_split))
    split_k = triton.cdiv(k_chunks, triton.cdiv(k_chunks, split_k))  # no empty splits
    block_d = 128 if b > 32 else 64
    while block_d > 16 and m_blocks * triton.cdiv(d, block_d) < num_sms:
        block_d //= 2
    return _Config(block_m, shrink_block_r, block_k, split_k, block_d, expand_block_r, num_stages=4 if small else 3)


def _stages(cfg: _Config, stage_bytes: int) -> int:
    return max(2, min(cfg.num_stages, _SMEM_BUDGET // stage_bytes))


def _check(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, col_dim: torch.Tensor,
           row_values: torch.Tensor, out: torch.Tensor | None) -> None:
    """Shape/dtype/device checks: metadata only, no device synchronisation."""
    if hidden.dim() != 2 or down.dim() != 2 or up.dim() != 2 or col_dim.dim() != 1 or row_values.dim() != 2:
        raise ValueError("expected hidden [B, D], down [D, R], up [R, D], col_dim [R], row_values [B, Ktot]")
    b, d = hidden.shape
    r = down.shape[1]
    if down.shape[0] != d or tuple(up.shape) != (r, d) or col_dim.shape[0] != r or row_values.shape[0] != b:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)}, col_dim {tuple(col_dim.shape)}, row_values {tuple(row_values.shape)}")
    if r > 0 and row_values.shape[1] == 0:
        raise ValueError("row_values has no columns but there are steer columns")
    if hidden.dtype not in (*_HALF, torch.float32) or down.dtype not in (*_HALF, torch.float32) \
            or up.dtype not in (*_HALF, torch.float32):
        raise TypeError("hidden, down and up must be bf16, fp16 or fp32")
    if not row_values.is_floating_point() or col_dim.dtype not in (torch.int32, torch.int64):
        raise TypeError("row_values must be floating point and col_dim int32/int64")
    tensors = [down, up, col_dim, row_values] + ([out] if out is not None else [])
    if any(t.device != hidden.device for t in tensors):
        raise ValueError("all tensors must be on hidden's device")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype):
        raise ValueError("out must have hidden's shape and dtype")


def _launch(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, col_dim: torch.Tensor,
            row_values: torch.Tensor, out: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """Run both kernels with an explicit config (the tests use this to cover split-K and tile shapes)."""
    b, d = hidden.shape
    r = down.shape[1]
    ktot = row_values.shape[1]
    upcast = hidden.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    fp32_shrink = not (hidden.dtype == down.dtype and hidden.dtype in _HALF)
    hilo = up.dtype == torch.bfloat16 and hidden.dtype in _HALF
    d_per_split = triton.cdiv(triton.cdiv(d, cfg.block_k), cfg.split_k) * cfg.block_k
    split_k = triton.cdiv(d, d_per_split)
    part = torch.empty((split_k, b, r), dtype=torch.float32, device=hidden.device)

    grid_s = (triton.cdiv(b, cfg.block_m), triton.cdiv(r, cfg.shrink_block_r), split_k)
    _shrink_kernel[grid_s](
        hidden, down, col_dim, row_values, part,
        b, d, r, d_per_split,
        hidden.stride(0), hidden.stride(1), down.stride(0), down.stride(1),
        row_values.stride(0), row_values.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.shrink_block_r, BLOCK_K=cfg.block_k,
        FP32_DOT=fp32_shrink, UPCAST=upcast, num_warps=cfg.num_warps,
        num_stages=_stages(cfg, cfg.block_k * (cfg.block_m * hidden.element_size()
                                               + cfg.shrink_block_r * down.element_size())),
    )
    grid_e = (triton.cdiv(b, cfg.block_m), triton.cdiv(d, cfg.block_d))
    _expand_kernel[grid_e](
        hidden, up, row_values, part, out,
        b, d, r, ktot,
        hidden.stride(0), hidden.stride(1), up.stride(0), up.stride(1),
        row_values.stride(0), row_values.stride(1), out.stride(0), out.stride(1),
        SPLIT_K=split_k, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.expand_block_r,
        BLOCK_KT=max(2, triton.next_power_of_2(ktot)), HILO=hilo, UPCAST=upcast, num_warps=cfg.num_warps,
        num_stages=_stages(cfg, cfg.expand_block_r * (cfg.block_m * 4 * split_k + cfg.block_d * up.element_size())),
    )
    return out


def steer_hidden_triton(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    col_dim: torch.Tensor,
    row_values: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h'_b = h_b + ((h_b @ down) * row_values[b, col_dim]) @ up with fp32 accumulation; the
    semantics of `steer_hidden_torch`, in two deterministic launches (see the module docstring).

    hidden [B, D] bf16/fp16/fp32 (any strides); down [D, R] and up [R, D] in hidden's dtype or
    another of those; col_dim [R] int; row_values [B, Ktot] float (eps folded in). Rows whose
    values are all zero are copied unchanged. `out` (hidden's shape and dtype) may be given,
    also `out=hidden` for an in-place update: each output tile is written only by the program
    that read the same tile of hidden, after the shrink has finished with hidden.
    """
    _check(hidden, down, up, col_dim, row_values, out)
    if out is None:
        out = torch.empty_like(hidden)
    b, d = hidden.shape
    r = down.shape[1]
    if b == 0 or d == 0:
        return out
    if r == 0:
        return out.copy_(hidden)
    if hidden.is_cuda:
        with torch.cuda.device(hidden.device):
            cfg = _pick_config(b, d, r, _num_sms(hidden.device.index))
            return _launch(hidden, down, up, col_dim, row_values, out, cfg)
    # CPU tensors: only meaningful under TRITON_INTERPRET=1 (the tests); a small nominal SM
    # count so the heuristics still produce multi-program grids.
    return _launch(hidden, down, up, col_dim, row_values, out, _pick_config(b, d, r, num_sms=8))
