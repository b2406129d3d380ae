"""The steer op h' = h + ((h @ down) * row_values[:, col_dim]) @ up as Triton kernels for CUDA.

Shapes: h [B, D] (the hidden state before the LM head), down [D, R], up [R, D], col_dim [R] (the
steer dim of each of the R columns), row_values [B, Ktot] (each row's values, eps folded in).

Design: two or three launches, deterministic, no host synchronisation
------------------------------------------------------------------------
1. `_shrink_kernel`, grid (row blocks, R tiles, split_k): one [BLOCK_M, BLOCK_R] tile of
   c = (h @ down) * row_values[b, col_dim[r]] over a 1/split_k share of D, written in fp32 to the
   scratch `coef[split, B, R16]`, and per row block a flag per column "some row uses it". Split
   over D only where R alone gives too few programs to stream `down` at full bandwidth (small R).
2. `_expand_kernel`, grid (row blocks, D tiles, split_r): adds the split_k partials of c in a
   fixed order, multiplies by `up` over the program's range of R and either finishes the rows
   (split_r == 1: + h, cast, store) or writes an fp32 partial `ypart[split, B, D16]`.
3. `_finalize_kernel` (only when split_r > 1), grid (16-row blocks, 32-column tiles): sums the
   split_r partials in a fixed order, adds h, casts and stores.

Why this shape. At decode (B <= 64) the op is a pair of skinny GEMMs bound by reading down and
up (2 * D * R weights); everything else (h, the scratch c, the partial outputs) is small and
stays in L2, but it is read again by every program that needs it, and those re-reads are what
made the first version slow (16-column expand tiles each re-reading all of c). An expand program
is a [BLOCK_M, BLOCK_D] output tile over a range of R: it reads split_k * rows * 4 bytes of c
per column of R against BLOCK_D * elt bytes of `up`, so `_pick_config` gives BLOCK_D about 8x
the rows (32 for up to 4 rows, 128 beyond; at most 1/4 of the `up` bytes up to 16 rows, about
equal at 64 rows where registers cap the tile) and gets the parallelism back by splitting R
(split_r) rather than narrowing BLOCK_D. The price of that split is the third launch and
split_r * B * D * 8 bytes of partials, small against `up` once R is large (the only case where
bandwidth matters; at small R the op is launch-latency bound). The shrink has the mirror
problem (every R tile reads h again): its BLOCK_R is twice the rows. split_k is one value (8),
used only where R gives too few R tiles and its re-reads are cheap (see `_pick_config`), so that
it adds one compiled variant per bucket at most.

One launch would need a grid-wide barrier, atomics into an fp32 accumulator (results then
change from run to run) or a "last program of a tile reduces" counter (a persistent buffer
that must be zero and private to one stream, a memory-ordering argument this project cannot
test without a GPU). Separate launches keep every sum in a fixed order (bit-reproducible),
the grids fixed by the shapes (CUDA-graph friendly: the scratch comes from torch's caching
allocator, nothing is zeroed, no counters) and every kernel checkable in Triton's interpreter.
On Hopper, programmatic dependent launch would let the expand prefetch `up` while the shrink
runs: a later step, once a GPU can measure it.

Pipelining and shared memory. Every main loop streams its weight tiles through Triton's
software pipeline (cp.async on sm_80/sm_90; wgmma on sm_90 for 64-row blocks, mma.sync
otherwise). The stage count comes from the target's shared memory per SM, shared by two
resident programs (about 105 KB of buffers each on H100/H200, 72 KB on A100), not from one
fixed budget, and the tiles are sized to get at least three stages. An explicit stage count (a
test, the benchmark's sweep) is used as given; if it does not fit, Triton refuses the launch
(OutOfResources) rather than the launcher quietly cutting it back. Nothing in a main loop waits
on data loaded in the same loop: the expand's column skip reads the shrink's int8 flags, not
the coefficients, so Triton pipelines both loads without keeping loaded tiles in registers.

Precision: fp32 accumulation throughout, products exact on the tensor cores.
 - h and down in the same 16-bit dtype: the native bf16/fp16 tensor-core dot (16-bit products
   are exact in fp32).
 - otherwise tf32 tensor-core dots on operands split so that hardly a bit is lost: a bf16/fp16
   value is exactly a tf32 value, an fp32 value is split into hi + lo, each with tf32's 11
   significant bits (masked here, so the hardware's truncation to tf32 is a no-op and the
   interpreter computes the same products); lo's truncation and the missing lo*lo term leave
   about 2^-19 relative at worst (2^-20 per split operand).
   fp32 x fp32 takes 3 dots, 16-bit x fp32 takes 2.
 - the expand's left operand is the fp32 c. With bf16 `up` and a 16-bit output it is split
   into bf16 hi + lo (2 bf16 dots, ~2^-16 relative, far below the output's rounding); with
   fp16 `up` (or an fp32 output) the tf32 split above is used (fp16 is exact in tf32, and tf32
   has fp32's exponent range, so unlike an fp16 hi/lo split nothing can overflow or flush).

Skipping: a row whose row_values are all zero is "unsteered": the last kernel computes a
per-row flag from row_values in-kernel and stores h itself for such rows (bit-identical, also
for -0.0 in h or inf/NaN in the weights). Columns no row of a block uses cost no weight
traffic: the shrink shortens its D loop to zero trips when no row of the block steers any
column of its tile and writes exact zeros wherever the value is zero; the expand masks off the
`up` rows of the columns the shrink flagged unused for the block. (An inf/NaN in skipped
weights does not reach the output, unlike 0 * inf in torch; finite weights agree.)

Compiled variants. Triton compiles one kernel per set of constexprs and per specialisation of
the integer arguments (a value equal to 1 becomes a constant, a multiple of 16 is marked
divisible). The batch size B, the split counts and loop lengths, R (as r_q) and the row_values
strides are `do_not_specialize`: they change from step to step or only bound masks, and
specialising on them only added variants (B == 1 compiled kernels of its own, and R == 1 one
that did not compile). D and the weight strides keep their specialisation, as their
divisibility lets Triton vectorise the loads; the rows of `down` carry their alignment as the
constexpr R_ALIGN (R = 1000 is 8-aligned, which "multiple of 16 or nothing" cannot say); the
scratch row strides are padded to multiples of 16. `warm_up` launches every variant the config
heuristic can pick for a model, so that nothing compiles while serving.

Later (many steers, a few per row): the kernels walk column ranges ([r_begin, r_end) per
program, per-column use flags) and row blocks; a per-row gather of stacked steer bases would
replace the row block by a segment of rows sharing a steer (a row-index list instead of
pid_m * BLOCK_M + arange) and the column range by that steer's columns (a per-program table
instead of pid_s * chunks_per_split), leaving the loops as they are.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["steer_hidden_triton", "variant_keys", "warm_up"]

_HALF = (torch.bfloat16, torch.float16)
_NO_SPEC = ["B", "KTOT", "k_tiles_per_split", "chunks_per_split", "final", "n_split", "stride_vb", "stride_vk"]
_BLOCK_KT = 16  # row_values columns per step of the steered-row test


@triton.jit
def _tf32_parts(x):
    """x (fp32) as hi + lo, each with tf32's 11 significant bits (the lowest 13 mantissa bits
    zeroed), so that a tf32 tensor core multiplies them exactly. |x - hi - lo| < 2^-20 |x|."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    lo = ((x - hi).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _mma(a, b, acc, NATIVE: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, every product exact in fp32 (see the module docstring). NATIVE: a and b share
    a 16-bit dtype. Otherwise tf32 dots; A_SPLIT/B_SPLIT: that operand is fp32 and is split.
    UPCAST (interpreter only, which cannot multiply bf16): the same exact products in fp32."""
    if NATIVE:
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    else:
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        a_hi = a32
        b_hi = b32
        if A_SPLIT:
            a_hi, a_lo = _tf32_parts(a32)
        if B_SPLIT:
            b_hi, b_lo = _tf32_parts(b32)
        if A_SPLIT:
            acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        if B_SPLIT:
            acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    return acc


@triton.jit
def _steered_rows(vals_ptr, rows64, rmask, KTOT, stride_vb, stride_vk, BLOCK_KT: tl.constexpr):
    """[BLOCK_M] flag: any of the row's KTOT values is non-zero (NaN counts as non-zero)."""
    count = (rows64 * 0).to(tl.int32)
    for k0 in range(0, KTOT, BLOCK_KT):
        kt = k0 + tl.arange(0, BLOCK_KT)
        v = tl.load(vals_ptr + rows64[:, None] * stride_vb + kt[None, :].to(tl.int64) * stride_vk,
                    mask=rmask[:, None] & (kt < KTOT)[None, :], other=0.0)
        count += tl.sum((v != 0).to(tl.int32), axis=1)
    steered = count > 0
    return steered


@triton.jit(do_not_specialize=[*_NO_SPEC, "r_q", "stride_dd_q"])
def _shrink_kernel(
    h_ptr, down_ptr, col_dim_ptr, vals_ptr, coef_ptr, used_ptr,
    B, D, r_q, R16, k_tiles_per_split,
    stride_hb, stride_hd, stride_dd_q, stride_dr, stride_vb, stride_vk, stride_cs, stride_cb,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R_ALIGN: tl.constexpr,
    NATIVE: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """coef[split, rows, cols] = (h[rows, Dsplit] @ down[Dsplit, cols]) * vals[rows, col_dim[cols]];
    the columns R..R16 of coef's padded rows are written as zeros. used[row block, cols] (int8,
    written by the first split): 1 where some row of the block has a non-zero value there.
    R = r_q * R_ALIGN and down's row stride = stride_dd_q * R_ALIGN: R_ALIGN (a power of two
    dividing both, at most 16 bytes' worth of elements) tells Triton how far the rows of `down`
    are aligned, so that they load in 16-byte vectors (and through cp.async) also when R is not a
    multiple of 16 (R = 1000, 200, ...).
    Triton's own specialisation only knows "multiple of 16" or nothing (and makes R == 1 a
    constant, a variant of its own); r_q and stride_dd_q are therefore not specialised."""
    R = r_q * R_ALIGN
    stride_dd = stride_dd_q * R_ALIGN
    pid_m = tl.program_id(0)  # fastest axis: the row blocks sharing a down tile run together (L2 reuse)
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
    col_used = tl.max((scale != 0).to(tl.int32), axis=0)  # [BLOCK_R]
    first_split = 1 - tl.minimum(pid_s, 1)  # an int, not a bool: the interpreter mis-broadcasts scalar bools
    tl.store(used_ptr + pid_m.to(tl.int64) * R16 + cols64, col_used.to(tl.int8), mask=cols < R16 * first_split)
    # Tile skip: no row of the block steers any column of the tile, so the D loop has no trips.
    used = tl.max(col_used, axis=0)
    d_begin = pid_s * k_tiles_per_split * BLOCK_K
    d_end = tl.minimum(D, d_begin + k_tiles_per_split * BLOCK_K)
    d_stop = d_begin + (d_end - d_begin) * used

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(d_begin, d_stop, BLOCK_K):
        ks = k0 + offs_k
        kmask = ks < d_end
        ks64 = ks.to(tl.int64)
        h = tl.load(h_ptr + rows64[:, None] * stride_hb + ks64[None, :] * stride_hd,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(down_ptr + ks64[:, None] * stride_dd + cols64[None, :] * stride_dr,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _mma(h, w, acc, NATIVE, A_SPLIT, B_SPLIT, UPCAST)

    coef = tl.where(scale != 0, acc * scale, 0.0)  # exact zeros where the value is zero (no 0 * inf)
    tl.store(coef_ptr + pid_s.to(tl.int64) * stride_cs + rows64[:, None] * stride_cb + cols64[None, :], coef,
             mask=rmask[:, None] & (cols < R16)[None, :])


@triton.jit(do_not_specialize=[*_NO_SPEC, "R"])
def _expand_kernel(
    h_ptr, up_ptr, vals_ptr, coef_ptr, used_ptr, dst_ptr,
    B, D, R, R16, KTOT, chunks_per_split, final,
    stride_hb, stride_hd, stride_ur, stride_ud, stride_vb, stride_vk, stride_cs, stride_cb,
    stride_ys, stride_yb, stride_yd,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_KT: tl.constexpr, HILO: tl.constexpr, B_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """acc = sum_splits(coef)[rows, Rrange] @ up[Rrange, dcols]. final (no split over R, a runtime
    flag so that it is no extra variant): dst = out, rows finished (h + acc for steered rows, h
    for the others); else dst = ypart, acc stored for split pid_s."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dcols < D
    rows64 = rows.to(tl.int64)
    dcols64 = dcols.to(tl.int64)

    # This program's columns of R: [r_begin, r_end). R itself is not specialised (its value
    # only bounds the rows of `up`); the coef loads are bounded by R16, a multiple of 16, so
    # that they vectorise (the shrink wrote zeros up to R16).
    r_begin = pid_s * chunks_per_split * BLOCK_R
    r_stop = r_begin + chunks_per_split * BLOCK_R
    r_end = tl.minimum(R, r_stop)
    r_end16 = tl.minimum(R16, r_stop)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        cols = r0 + offs_r
        cols64 = cols.to(tl.int64)
        a_ptrs = coef_ptr + rows64[:, None] * stride_cb + cols64[None, :]
        a_mask = rmask[:, None] & (cols < r_end16)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        for s in tl.static_range(1, SPLIT_K):  # fixed order: deterministic
            a += tl.load(a_ptrs + s * stride_cs, mask=a_mask, other=0.0)
        # Column skip: the up rows of columns no row of the block uses are not read (the shrink
        # left their coefficients exactly zero and flagged them; the flag, not the coefficients,
        # decides, so the up load does not wait for the coef load).
        used = tl.load(used_ptr + pid_m.to(tl.int64) * R16 + cols64, mask=cols < r_end16, other=0)
        w = tl.load(up_ptr + cols64[:, None] * stride_ur + dcols64[None, :] * stride_ud,
                    mask=(used != 0)[:, None] & dmask[None, :], other=0.0)
        if HILO:
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            acc = _mma(a_lo, w, acc, True, False, False, UPCAST)
            acc = _mma(a_hi, w, acc, True, False, False, UPCAST)
        else:
            acc = _mma(a, w, acc, False, True, B_SPLIT, UPCAST)

    omask = rmask[:, None] & dmask[None, :]
    if final != 0:
        steered = _steered_rows(vals_ptr, rows64, rmask, KTOT, stride_vb, stride_vk, BLOCK_KT)
        h = tl.load(h_ptr + rows64[:, None] * stride_hb + dcols64[None, :] * stride_hd, mask=omask, other=0.0)
        res = (h.to(tl.float32) + acc).to(dst_ptr.dtype.element_ty)
        res = tl.where(steered[:, None], res, h.to(dst_ptr.dtype.element_ty))  # unsteered rows: h, bit for bit
        tl.store(dst_ptr + rows64[:, None] * stride_yb + dcols64[None, :] * stride_yd, res, mask=omask)
    else:
        tl.store(dst_ptr + pid_s.to(tl.int64) * stride_ys + rows64[:, None] * stride_yb + dcols64[None, :],
                 acc, mask=omask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _finalize_kernel(
    h_ptr, vals_ptr, ypart_ptr, out_ptr,
    B, D, KTOT, n_split,
    stride_hb, stride_hd, stride_vb, stride_vk, stride_ys, stride_yb, stride_ob, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KT: tl.constexpr, MAX_SPLIT: tl.constexpr,
):
    """out = h + sum_splits(ypart) (in split order) for steered rows, h for the others. The
    split loop is unrolled to MAX_SPLIT masked loads, so that they are all in flight at once."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dcols < D
    rows64 = rows.to(tl.int64)
    dcols64 = dcols.to(tl.int64)
    omask = rmask[:, None] & dmask[None, :]

    p_ptrs = ypart_ptr + rows64[:, None] * stride_yb + dcols64[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for s in tl.static_range(0, MAX_SPLIT):  # fixed order: deterministic
        rows_s = tl.where(s < n_split, B, 0)  # no rows for the splits past n_split: masked off
        acc += tl.load(p_ptrs + s * stride_ys, mask=(rows < rows_s)[:, None] & dmask[None, :], other=0.0)
    steered = _steered_rows(vals_ptr, rows64, rmask, KTOT, stride_vb, stride_vk, BLOCK_KT)
    h = tl.load(h_ptr + rows64[:, None] * stride_hb + dcols64[None, :] * stride_hd, mask=omask, other=0.0)
    res = (h.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
    res = tl.where(steered[:, None], res, h.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + rows64[:, None] * stride_ob + dcols64[None, :] * stride_od, res, mask=omask)


# ----------------------------------------------------------------------------------------------
# Host side: targets, configs, launch plans.


@dataclass(frozen=True)
class _Target:
    """What the config heuristic needs to know about a GPU."""

    num_sms: int
    smem_per_block: int  # the most dynamic shared memory one program may opt into (bytes)
    smem_per_sm: int  # shared memory of one multiprocessor, shared by its resident programs


# (capability major, minor) -> (smem per block opt-in, smem per SM), from CUDA's tuning guides.
_SMEM = {(8, 0): (166912, 167936), (8, 6): (101376, 102400), (8, 7): (166912, 167936), (8, 9): (101376, 102400),
         (9, 0): (232448, 233472), (10, 0): (232448, 233472), (12, 0): (101376, 102400)}
# Nominal targets for compiling without a GPU (tests, reports) and for the interpreter.
TARGETS = {"sm_90": _Target(132, *_SMEM[(9, 0)]), "sm_80": _Target(108, *_SMEM[(8, 0)]),
           "interpreter": _Target(8, *_SMEM[(9, 0)])}


@functools.cache
def _device_target(device_index: int) -> _Target:
    props = torch.cuda.get_device_properties(device_index)
    per_block, per_sm = _SMEM.get((props.major, props.minor), (101376, 102400))
    per_block = getattr(props, "shared_memory_per_block_optin", per_block) or per_block
    per_sm = getattr(props, "shared_memory_per_multiprocessor", per_sm) or per_sm
    return _Target(props.multi_processor_count, per_block, per_sm)


@dataclass(frozen=True)
class _Config:
    """Launch shape, chosen from the host-known sizes only, never from tensor contents.
    Stages None: as many as fit two programs per SM (at most _MAX_STAGES); a number: used as is."""

    block_m: int  # rows per program (both kernels)
    shrink_block_r: int  # R columns per shrink program
    block_k: int  # D step of the shrink's loop
    split_k: int  # shrink programs along D (partials summed by the expand)
    block_d: int  # D columns per expand program
    expand_block_r: int  # R step of the expand's loop
    split_r: int = 1  # expand programs along R (> 1: partial outputs and a finalize launch)
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int | None = None
    expand_stages: int | None = None


_MAX_STAGES = 6
_SMEM_RESERVE = 1024 + 8192  # per program: the driver's 1 KB plus room for epilogue layout conversions
_MAX_SPLIT_R = 16  # the finalize kernel adds at most this many partial outputs
_FIN_BLOCK_M = 16
_FIN_BLOCK_D = 32
_FIN_WARPS = 4
_FIN_STAGES = 3


def _pow2_at_most(x: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(x, cap):
        p *= 2
    return p


# Batch buckets: (largest batch, rows per program, expand BLOCK_D without a D split). Few buckets,
# few compiled variants. BLOCK_D = 8 x rows keeps the scratch re-reads at a quarter of the `up`
# bytes; 64-row blocks stay at 128 (256 spills registers).
_BUCKETS = ((4, 16, 32), (16, 16, 128), (32, 32, 128), (1 << 62, 64, 128))


_SMALL_WEIGHTS = 2 << 20  # bytes of down (or up) under which the op is launch-latency bound
_SPLIT_K = 8  # the one split over D the heuristic uses (one extra variant per bucket)


@functools.lru_cache(maxsize=4096)
def _pick_config(b: int, d: int, r: int, target: _Target, h_size: int = 2, w_size: int = 2) -> _Config:
    """Heuristic tiles (estimates until the benchmark's sweep on a GPU says otherwise).

    Decode (small B) is bound by reading down and up: every kernel wants about one program per
    SM with at least two tiles in flight (three pipeline stages). The batch picks a bucket (rows
    per program, the expand's BLOCK_D). Shrink: BLOCK_R twice the rows (every R tile reads h
    again). Where that leaves fewer R tiles than 3/4 of the SMs: a split over D into 8 partials
    if its cost is small, i.e. every D tile of the expand re-reading the partials stays within
    half the `up` bytes (up to 4 rows) or the weights are small enough (2 MB) that the op is
    latency bound anyway; otherwise BLOCK_R = the rows (twice the tiles, no partials). Expand:
    BLOCK_D from the bucket (at least 128 under a split), then a split over R where there are
    too few D tiles (not for small weights: a third launch costs more than it saves there).
    fp32 weights take shorter tiles (their tf32 hi/lo splits need the registers).
    h_size/w_size: bytes per element of h and of the weights."""
    block_m, block_d = next((m, bd) for top, m, bd in _BUCKETS if b <= top)
    rows = min(block_m, next(top for top, _, _ in _BUCKETS if b <= top))  # the bucket's largest batch
    m_blocks = triton.cdiv(b, block_m)
    enough = (3 * target.num_sms) // 4
    stage_cap = _stage_budget(target) // 2  # three stages at least

    shrink_block_r = 2 * block_m
    split_k = 1
    if m_blocks * triton.cdiv(r, shrink_block_r) < enough:
        cheap = _SPLIT_K * rows * 4 * 2 <= max(block_d, 128) * w_size or d * r * w_size <= _SMALL_WEIGHTS
        if cheap and d >= 2 * 64 * _SPLIT_K:  # two 64-deep D tiles per split at least
            split_k = _SPLIT_K
        else:
            shrink_block_r = block_m
    # Tiles past D are masked off. fp32 weights (tf32 hi/lo splits of the operands) spill at
    # more than 64 (32 for 64 rows); so do rows that cannot be copied in 16-byte vectors (R or D
    # not a multiple of 16 bytes' worth of elements: element-wise loads held in registers) at
    # more than 32.
    block_k = 64 if split_k > 1 or w_size == 4 else 256 if block_m == 16 else 128
    if w_size == 4 and block_m == 64:
        block_k = 32
    if r % (16 // w_size) or d % (16 // h_size):
        block_k = 32
    while block_k > 32 and block_k * (block_m * h_size + shrink_block_r * w_size) > stage_cap:
        block_k //= 2

    if split_k > 1:
        block_d = max(block_d, 128)
    expand_block_r = 32 if w_size == 4 else 64
    while expand_block_r > 16 and expand_block_r * (split_k * block_m * 4 + block_d * w_size) > stage_cap:
        expand_block_r //= 2
    d_programs = m_blocks * triton.cdiv(d, block_d)
    r_chunks = triton.cdiv(r, expand_block_r)
    split_r = 1
    if d_programs < enough and d * r * w_size > _SMALL_WEIGHTS:
        split_r = max(1, min(triton.cdiv(target.num_sms, d_programs), r_chunks // 2, _MAX_SPLIT_R))
    return _Config(block_m, shrink_block_r, block_k, split_k, block_d, expand_block_r, split_r,
                   shrink_warps=8 if block_m * shrink_block_r >= 64 * 64 else 4,
                   expand_warps=8 if block_m * block_d >= 64 * 128 else 4)


def _stage_budget(target: _Target) -> int:
    """Shared memory for one program's pipeline buffers: two programs per SM."""
    return min(target.smem_per_block, target.smem_per_sm // 2) - _SMEM_RESERVE


def _auto_stages(stage_bytes: int, target: _Target) -> int:
    """Pipeline depth: Triton keeps (stages - 1) tiles in shared memory."""
    return max(2, min(_MAX_STAGES, 1 + _stage_budget(target) // max(1, stage_bytes)))


def _shrink_stage_bytes(cfg: _Config, h_size: int, w_size: int) -> int:
    return cfg.block_k * (cfg.block_m * h_size + cfg.shrink_block_r * w_size)


def _expand_stage_bytes(cfg: _Config, split_k: int, w_size: int) -> int:
    return cfg.expand_block_r * (split_k * cfg.block_m * 4 + cfg.block_d * w_size)


@dataclass(frozen=True)
class _Launch:
    """One kernel launch: the JIT function, its grid, positional arguments and keywords
    (constexprs and num_warps/num_stages). `key` names the compiled variant it needs (B, split
    counts and loop lengths are not specialised, so they do not appear)."""

    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict

    @property
    def key(self) -> tuple:
        name = getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__
        return (name, tuple(sorted(self.kwargs.items())))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pow2_divisor(*xs: int, cap: int = 16) -> int:
    """The largest power of two up to `cap` that divides every x."""
    a = cap
    while a > 1 and any(x % a for x in xs):
        a //= 2
    return a


def _plan(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, col_dim: torch.Tensor,
          row_values: torch.Tensor, out: torch.Tensor, cfg: _Config, target: _Target,
          interpret: bool) -> list[_Launch]:
    """The launches for one call (scratch allocated on hidden's device; `meta` tensors give a plan
    without memory, which is how the compile test enumerates the variants).

    hidden [B, D], down [D, R], up [R, D], col_dim [R], row_values [B, Ktot], out [B, D]; scratch:
    coef [split_k, B, R16] fp32, used [row blocks, R16] int8 and, for split_r > 1, ypart
    [split_r, B, D16] fp32 (row strides padded to a multiple of 16 elements)."""
    b, d = hidden.shape
    r = down.shape[1]
    ktot = row_values.shape[1]
    h_size, w_size = hidden.element_size(), down.element_size()
    native = hidden.dtype == down.dtype and hidden.dtype in _HALF
    hilo = up.dtype == torch.bfloat16 and hidden.dtype in _HALF
    upcast = interpret and (hidden.dtype == torch.bfloat16 or up.dtype == torch.bfloat16)

    k_tiles = triton.cdiv(d, cfg.block_k)
    k_tiles_per_split = triton.cdiv(k_tiles, cfg.split_k)
    split_k = cfg.split_k  # a trailing split may be empty (it writes zeros): one variant per split count
    r16 = _round_up(r, 16)
    r_align = _pow2_divisor(r, down.stride(0), cap=16 // down.element_size())  # 16-byte rows are enough
    coef = torch.empty((split_k, b, r16), dtype=torch.float32, device=hidden.device)
    used = torch.empty((triton.cdiv(b, cfg.block_m), r16), dtype=torch.int8, device=hidden.device)
    shrink_stages = cfg.shrink_stages or _auto_stages(_shrink_stage_bytes(cfg, h_size, w_size), target)
    launches = [_Launch(
        _shrink_kernel,
        (triton.cdiv(b, cfg.block_m), triton.cdiv(r, cfg.shrink_block_r), split_k),
        (hidden, down, col_dim, row_values, coef, used,
         b, d, r // r_align, r16, k_tiles_per_split,
         hidden.stride(0), hidden.stride(1), down.stride(0) // r_align, down.stride(1),
         row_values.stride(0), row_values.stride(1), coef.stride(0), coef.stride(1)),
        dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.shrink_block_r, BLOCK_K=cfg.block_k, R_ALIGN=r_align, NATIVE=native,
             A_SPLIT=not native and hidden.dtype == torch.float32,
             B_SPLIT=not native and down.dtype == torch.float32, UPCAST=upcast and native,
             num_warps=cfg.shrink_warps, num_stages=shrink_stages),
    )]

    r_chunks = triton.cdiv(r, cfg.expand_block_r)
    chunks_per_split = triton.cdiv(r_chunks, cfg.split_r)
    split_r = triton.cdiv(r_chunks, chunks_per_split)  # no empty splits
    if split_r > _MAX_SPLIT_R:
        raise ValueError(f"split_r {cfg.split_r} gives {split_r} partial outputs; at most {_MAX_SPLIT_R}")
    final = split_r == 1
    if final:
        dst, ys, yb, yd = out, 0, out.stride(0), out.stride(1)
    else:
        dst = torch.empty((split_r, b, _round_up(d, 16)), dtype=torch.float32, device=hidden.device)
        ys, yb, yd = dst.stride(0), dst.stride(1), 1
    expand_stages = cfg.expand_stages or _auto_stages(_expand_stage_bytes(cfg, split_k, up.element_size()), target)
    launches.append(_Launch(
        _expand_kernel,
        (triton.cdiv(b, cfg.block_m), triton.cdiv(d, cfg.block_d), split_r),
        (hidden, up, row_values, coef, used, dst,
         b, d, r, r16, ktot, chunks_per_split, int(final),
         hidden.stride(0), hidden.stride(1), up.stride(0), up.stride(1),
         row_values.stride(0), row_values.stride(1), coef.stride(0), coef.stride(1), ys, yb, yd),
        dict(SPLIT_K=split_k, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.expand_block_r,
             BLOCK_KT=_BLOCK_KT, HILO=hilo, B_SPLIT=not hilo and up.dtype == torch.float32,
             UPCAST=upcast and hilo, num_warps=cfg.expand_warps, num_stages=expand_stages),
    ))
    if not final:
        launches.append(_Launch(
            _finalize_kernel,
            (triton.cdiv(b, _FIN_BLOCK_M), triton.cdiv(d, _FIN_BLOCK_D), 1),
            (hidden, row_values, dst, out,
             b, d, ktot, split_r,
             hidden.stride(0), hidden.stride(1), row_values.stride(0), row_values.stride(1),
             dst.stride(0), dst.stride(1), out.stride(0), out.stride(1)),
            dict(BLOCK_M=_FIN_BLOCK_M, BLOCK_D=_FIN_BLOCK_D, BLOCK_KT=_BLOCK_KT, MAX_SPLIT=_MAX_SPLIT_R,
                 num_warps=_FIN_WARPS, num_stages=_FIN_STAGES),
        ))
    return launches


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _run(launches: list[_Launch]) -> None:
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


def _target_for(hidden: torch.Tensor) -> _Target:
    if hidden.is_cuda:
        return _device_target(hidden.device.index if hidden.device.index is not None else torch.cuda.current_device())
    return TARGETS["interpreter"]  # CPU tensors: only meaningful under TRITON_INTERPRET=1 (the tests)


def _default_config(hidden: torch.Tensor, down: torch.Tensor, target: _Target) -> _Config:
    b, d = hidden.shape
    return _pick_config(b, d, down.shape[1], target, hidden.element_size(), down.element_size())


def _launch(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, col_dim: torch.Tensor,
            row_values: torch.Tensor, out: torch.Tensor, cfg: _Config | None = None) -> torch.Tensor:
    """Run the kernels with an explicit config (the tests and the benchmark's sweep use this to
    cover split and tile shapes the heuristic rarely picks); cfg None: the heuristic's.
    hidden [B, D], down [D, R], up [R, D], col_dim [R], row_values [B, Ktot], out [B, D] in
    hidden's dtype (may be hidden itself)."""
    _check(hidden, down, up, col_dim, row_values, out)
    target = _target_for(hidden)
    cfg = cfg or _default_config(hidden, down, target)
    if hidden.is_cuda:
        with torch.cuda.device(hidden.device):
            _run(_plan(hidden, down, up, col_dim, row_values, out, cfg, target, _interpreting()))
    else:
        _run(_plan(hidden, down, up, col_dim, row_values, out, cfg, target, _interpreting()))
    return out


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


def steer_hidden_triton(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    col_dim: torch.Tensor,
    row_values: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """h'_b = h_b + ((h_b @ down) * row_values[b, col_dim]) @ up with fp32 accumulation; the
    semantics of `steer_hidden_torch`, in two or three deterministic launches (see the module
    docstring).

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
    if b == 0 or d == 0:
        return out
    if down.shape[1] == 0:
        return out.copy_(hidden)
    return _launch(hidden, down, up, col_dim, row_values, out)


def warm_up(hidden_size: int, total_rank: int, num_dims: int, hidden_dtype: torch.dtype,
            weight_dtype: torch.dtype, max_batch: int, device: torch.device | str) -> int:
    """Compile (by launching once, on zeros) every kernel variant the config heuristic can pick
    for batches 1..max_batch at these sizes, so that none compiles while serving; returns how
    many distinct variants that is. One row's first value is non-zero so the steered path runs.
    hidden_size D, total_rank R, num_dims Ktot as in `steer_hidden_triton`."""
    device = torch.device(device)
    d, r = hidden_size, total_rank
    if r == 0 or d == 0 or max_batch <= 0:
        return 0
    down = torch.zeros((d, r), dtype=weight_dtype, device=device)
    up = torch.zeros((r, d), dtype=weight_dtype, device=device)
    col_dim = torch.zeros((r,), dtype=torch.int64, device=device)
    seen: set[tuple] = set()
    for b in range(1, max_batch + 1):
        hidden = torch.zeros((b, d), dtype=hidden_dtype, device=device)
        values = torch.zeros((b, max(1, num_dims)), dtype=torch.float32, device=device)
        values[0, 0] = 1.0
        out = torch.empty_like(hidden)
        target = _target_for(hidden)
        cfg = _default_config(hidden, down, target)
        launches = _plan(hidden, down, up, col_dim, values, out, cfg, target, _interpreting())
        keys = [launch.key for launch in launches]
        if all(k in seen for k in keys):
            continue
        seen.update(keys)
        if hidden.is_cuda:
            with torch.cuda.device(device):
                _run(launches)
        else:
            _run(launches)
    return len(seen)


def variant_keys(hidden_size: int, total_rank: int, num_dims: int, hidden_dtype: torch.dtype,
                 weight_dtype: torch.dtype, max_batch: int, target: _Target) -> set[tuple]:
    """The variant keys `warm_up` would compile for `target` (planned on meta tensors, no memory)."""
    keys: set[tuple] = set()
    d, r = hidden_size, total_rank
    down = torch.empty((d, r), dtype=weight_dtype, device="meta")
    up = torch.empty((r, d), dtype=weight_dtype, device="meta")
    col_dim = torch.empty((r,), dtype=torch.int64, device="meta")
    for b in range(1, max_batch + 1):
        hidden = torch.empty((b, d), dtype=hidden_dtype, device="meta")
        values = torch.empty((b, max(1, num_dims)), dtype=torch.float32, device="meta")
        cfg = _pick_config(b, d, r, target, hidden.element_size(), down.element_size())
        for launch in _plan(hidden, down, up, col_dim, values, hidden, cfg, target, _interpreting()):
            keys.add(launch.key)
    return keys

