"""The per-row gather steer op as Triton kernels for CUDA (Punica SGMV style, segmented by steer).

    h'_b = h_b + sum_s sum_k row_values[b, s, k] * (h_b @ down[:, c_k]) @ up[u_k]

over the steers n = row_steer[b, s] a row names (-1: none), where steer n's dim k owns the columns
c_k = down_start + k*r .. + r of `down` and the rows u_k = up_start + k*r .. + r of `up` (cols[n] =
(down_start, K, r, up_start)). Shapes: hidden [B, D]; down [D, C] (every steer's P1_k side by
side); up [U, D] (their P2_k^T stacked); cols [N, 4] int; row_steer [B, S] int; row_values
[B, S, Kmax] fp32 (eps folded in). On CUDA every steer is factored (up_start >= 0): the launcher
refuses a dense bank. The semantics are those of `steer_torch.steer_hidden_gather_torch`.

Design: segments of (row, slot) pairs sharing a steer; five launches; no host synchronisation
----------------------------------------------------------------------------------------------
0. `torch.sort(row_steer.flatten(), stable=True)`: the P = B*S (row, slot) pairs ordered by steer
   (unsteered pairs, -1, first). Fixed shape, on the device.
1. `_plan_kernel`, one program: cuts each run of equal valid steers into chunks of at most
   BLOCK_M pairs and writes the chunk starts, compacted (a prefix sum), and their count to device
   memory. The start of each pair's run comes from a binary search in the sorted keys.
2. `_gshrink_kernel`, persistent (a fixed grid of about two programs per SM looping over work
   items; the item count is read from the plan's count): item (chunk, column tile, D split)
   computes coef[split, pairs, cols] = (h[rows] @ down[Dsplit, steer's cols]) * value[row, slot,
   dim of col] for the pairs of one chunk (rows gathered through the sort's permutation) over a
   tile of its steer's K*r columns, in fp32.
3. `_gexpand_kernel`, persistent: item (chunk, D tile) sums the D-split partials of coef in a
   fixed order, multiplies by the steer's rows of `up` and, for rows that name exactly one steer,
   finishes them (out = h + acc, cast); pairs of rows naming several steers write an fp32
   partial ypart[slot, row, D tile] instead.
4. `_gfinal_kernel`, grid (16-row blocks, D tiles): rows naming no steer get h, bit for bit; rows
   naming several get h + sum over their slots of ypart, in slot order; rows naming one are left
   as the expand wrote them.

Why segments and not a per-row BGMV. A per-row kernel (each program one row and its steer)
re-reads a steer's weights once per row using it: with 256 rows on one steer that is 256x the
bytes, and with 64 steers on 256 rows 4x. Sorting the pairs by steer makes each chunk one small
GEMM over one steer's weights, so each used steer's down and up are streamed once per chunk of
BLOCK_M rows (once when its rows fit in one chunk; repeats of bigger segments come from L2), the
weights of loaded steers no row names are never touched (an inf/NaN there cannot reach the
output), and the cost of a step follows the steers its rows use, not the bank's size.

Why persistent programs. The number of chunks is data-dependent (between B*S/BLOCK_M and B*S),
and a grid sized for the worst case with programs that exit at once still launches every CTA:
at two resident programs per SM (the pipeline's shared memory), tens of thousands of empty CTAs
take longer than the work. So the grids are fixed (from B, S, N, the largest K*r and the target's
SM count, never from tensor contents: CUDA-graph friendly) and each program walks the work items
pid, pid + grid, ... up to the count the plan wrote on the device. Chunks of a steer are adjacent,
so programs running at the same time share a steer's tiles and a chunk's rows in L2.

Determinism: every element of coef, ypart and out is written by exactly one work item, and every
sum (over D inside a dot, over D splits, over R, over slots) runs in a fixed order: no atomics,
results are bit-reproducible. A row's result does not depend on which other rows share its chunk
or on its position in it (a dot's rows are independent). Scratch (sorted keys, chunk table, coef,
ypart) comes from torch's caching allocator; nothing needs zeroing.

Tiles and splits (`_pick_config`, from host-known sizes only: the pairs P = B*S, D, the bank's
largest K*r, the dtypes and alignment, and whether S > 1). BLOCK_M from P (16 up to 16 pairs, 32 up
to 32, else 64: at most 4 MMA row-blocks wasted per chunk, cheap because the op is bound by bytes,
not FLOPs). Shrink tiles of 2*BLOCK_M columns; where the batch's chunks times column tiles give
too few items for the SMs even with one steer, a split over D (8 partials for 16-pair chunks, 4 for
bigger ones; only while the expand's re-reads of the partials stay small: 16 pairs or fewer, or a
steer of 2 MB or less), and BLOCK_M-wide column tiles. Expand tiles of 128 D columns over steps of
64 (fp32: 32) rows of `up`, narrower where registers run out: 64 columns for 16-pair chunks without
a split, for fp32 weights from 32-pair chunks and for 64-pair chunks when S > 1 (the second, fp32
partial store) or under a split, 32-row steps for 64-pair chunks under a split and when S > 1 with
64-pair chunks or a split. The compile test checks
that these defaults spill no registers on sm_80 and sm_90 under both Tritons.

Pipelining and shared memory. Every main loop (the shrink's D loop, the expand's R loop) streams
its weight tiles through Triton's software pipeline (cp.async on sm_80/sm_90; the stage count
from the target's shared memory shared by two programs per SM, at least three stages). The
column offset of a steer in `down` is data-dependent, so the bank's alignment is passed as the
constexpr COL_ALIGN: 16 bytes' worth of elements (8 bf16, 4 fp32) when that divides every
down_start, the width and the row stride of `down` (`GatherLayout.start_align`; banks of ranks such
as 64 and 1000 with K = 2 always are), else 1. The down tile's loads then run to K*r rounded up to
COL_ALIGN (still inside `down`), so that their mask is constant over 16-byte groups and they go
through cp.async in vectors; the extra columns only reach coefficients that are stored as zeros.

Precision: fp32 accumulation throughout, products exact on the tensor cores (`_mma`):
 - h and down in the same 16-bit dtype: the native bf16/fp16 tensor-core dot (16-bit products
   are exact in fp32).
 - otherwise tf32 tensor-core dots on operands split so that hardly a bit is lost: a bf16/fp16
   value is exactly a tf32 value, an fp32 value is split into hi + lo, each with tf32's 11
   significant bits (masked here, so the hardware's truncation to tf32 is a no-op and the
   interpreter computes the same products); lo's truncation and the missing lo*lo term leave
   about 2^-19 relative at worst (2^-20 per split operand).
   fp32 x fp32 takes 3 dots, 16-bit x fp32 takes 2.
 - the expand's left operand is the fp32 coef. With bf16 `up` and a 16-bit output it is split
   into bf16 hi + lo (2 bf16 dots, ~2^-16 relative, far below the output's rounding); with
   fp16 `up` (or an fp32 output) the tf32 split above is used (fp16 is exact in tf32, and tf32
   has fp32's exponent range, so unlike an fp16 hi/lo split nothing can overflow or flush).
 Coefficients where a value is zero are exact zeros (no 0 * inf), and `up` rows past a steer's
 K*r columns are masked off.

Compiled variants. Triton compiles one kernel per set of constexprs and per specialisation of the
integer arguments (a value equal to 1 becomes a constant, a multiple of 16 is marked divisible).
Everything that changes with the batch (B, S, P, grid sizes, loop lengths, the strides of
row_steer and row_values) is `do_not_specialize`; D and the weight strides keep their
specialisation (their divisibility vectorises the loads). `warm_up` launches every variant the
heuristic can pick for batches 1..max_batch with 1..max_steers slots, so that nothing compiles
while serving; `variant_keys` lists them (on meta tensors) for tests/test_kernel_compile.py.

Costs and limits. A step is five launches (sort, plan, shrink, expand, finalize) whatever the
steers: at decode with small steers the op is launch-latency bound, not bandwidth bound. A row
naming several steers costs an fp32 partial per slot (written and read once). The plan kernel
is one program: it is O(P log P) and meant for P up to a few thousand pairs.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import GatherLayout

__all__ = ["GatherLayout", "steer_hidden_gather_triton", "variant_keys", "warm_up"]

_HALF = (torch.bfloat16, torch.float16)
# Arguments that change with the batch (or only bound loops and masks): never specialised, so that
# B == 1, S == 1 or a batch that happens to be a multiple of 16 compile no variants of their own.
_NO_SPEC = ["P", "S", "N", "B", "n_tiles", "n_dtiles", "k_tiles_per_split", "nprog", "log_p",
            "stride_vb", "stride_vs", "stride_vk", "stride_rb", "stride_rs", "stride_cs", "stride_ys", "stride_yb"]


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



@triton.jit(do_not_specialize=_NO_SPEC)
def _plan_kernel(keys_ptr, chunk_ptr, count_ptr, P, N, log_p, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """keys [P] sorted steer indices (values outside [0, N): no steer). Writes chunk_ptr[0..n) the
    sorted positions where a chunk starts (a valid run's first pair, then every BLOCK_M-th pair of
    the run), ascending, and count_ptr[0] = n. One program; log_p >= bits of P."""
    carry = tl.sum(tl.zeros((1,), dtype=tl.int32), axis=0)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < P
        key = tl.load(keys_ptr + p, mask=pmask, other=-1).to(tl.int64)
        valid = pmask & (key >= 0) & (key < N)
        # The first position of p's run of equal keys: binary search in [0, p] (keys[p] == key).
        lo = p * 0
        hi = tl.where(pmask, p, 0)
        for _ in range(0, log_p):
            mid = (lo + hi) // 2
            v = tl.load(keys_ptr + mid, mask=pmask, other=0).to(tl.int64)
            right = v < key
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right, hi, mid)
        flag = (valid & ((p - lo) % BLOCK_M == 0)).to(tl.int32)
        slot = carry + tl.cumsum(flag, axis=0) - 1
        tl.store(chunk_ptr + slot, p, mask=flag != 0)
        carry += tl.sum(flag, axis=0)
    tl.store(count_ptr, carry)


@triton.jit
def _chunk(start, keys_ptr, order_ptr, cols_ptr, P, S, stride_cn, BLOCK_M: tl.constexpr):
    """The pairs of the chunk starting at sorted position `start`: its steer's (down_start, K*r,
    r, up_start), the mask of the pairs that belong to it (the run of its steer within BLOCK_M
    positions) and their rows and slots (int64)."""
    steer = tl.load(keys_ptr + start).to(tl.int64)
    down_start = tl.load(cols_ptr + steer * stride_cn)
    num_dims = tl.load(cols_ptr + steer * stride_cn + 1)
    rank = tl.load(cols_ptr + steer * stride_cn + 2)
    up_start = tl.load(cols_ptr + steer * stride_cn + 3)
    pairs = start + tl.arange(0, BLOCK_M)
    pkeys = tl.load(keys_ptr + pairs, mask=pairs < P, other=-1).to(tl.int64)
    pmask = (pairs < P) & (pkeys == steer)
    flat = tl.load(order_ptr + pairs, mask=pmask, other=0).to(tl.int64)
    rows = flat // S
    slots = flat - rows * S
    return down_start, num_dims * rank, rank, up_start, pairs.to(tl.int64), pmask, rows, slots


@triton.jit
def _slots_used(rs_ptr, rows, rmask, S, N, stride_rb, stride_rs):
    """[BLOCK] how many of each row's S slots name a steer (0 <= index < N)."""
    count = (rows * 0).to(tl.int32)
    for q in range(0, S):
        v = tl.load(rs_ptr + rows * stride_rb + q * stride_rs, mask=rmask, other=-1).to(tl.int64)
        count += ((v >= 0) & (v < N)).to(tl.int32)
    return count


@triton.jit(do_not_specialize=[*_NO_SPEC, "stride_dd_q"])
def _gshrink_kernel(
    h_ptr, down_ptr, cols_ptr, keys_ptr, order_ptr, chunk_ptr, count_ptr, vals_ptr, coef_ptr,
    P, S, D, n_tiles, k_tiles_per_split, nprog,
    stride_hb, stride_hd, stride_dd_q, stride_dc, stride_cn, stride_vb, stride_vs, stride_vk, stride_cs, stride_cp,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    COL_ALIGN: tl.constexpr, NATIVE: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Work item (chunk, column tile, D split): coef[split, pairs, cols] = (h[rows, Dsplit] @
    down[Dsplit, down_start + cols]) * vals[row, slot, col // r] for the chunk's pairs over one
    BLOCK_C tile of its steer's K*r columns; zeros up to K*r rounded up to 16 (the expand's
    vectorised loads). down's row stride = stride_dd_q * COL_ALIGN and every down_start is a
    multiple of COL_ALIGN: Triton then knows how far a steer's rows are aligned."""
    stride_dd = stride_dd_q * COL_ALIGN
    n_items = tl.load(count_ptr) * n_tiles * SPLIT_K
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), n_items, nprog):
        split = item % SPLIT_K
        tile = (item // SPLIT_K) % n_tiles
        start = tl.load(chunk_ptr + item // (SPLIT_K * n_tiles))
        down_start, kr, rank, _, pairs, pmask, rows, slots = _chunk(start, keys_ptr, order_ptr, cols_ptr, P, S,
                                                                    stride_cn, BLOCK_M)
        down_start = (down_start // COL_ALIGN) * COL_ALIGN  # a no-op that tells Triton the alignment
        kr16 = (kr + 15) // 16 * 16
        # The weight loads run to K*r rounded up to COL_ALIGN (within `down`: COL_ALIGN divides its
        # width and every start), so that the mask is constant over COL_ALIGN columns and the rows
        # load in vectors; the extra columns only reach coef columns that are stored as zeros.
        kr_a = (kr + COL_ALIGN - 1) // COL_ALIGN * COL_ALIGN
        cols = tile * BLOCK_C + offs_c
        cmask = cols < kr
        wmask = cols < kr_a
        cols64 = (down_start + cols).to(tl.int64)
        live = tl.minimum(tl.maximum(kr - tile * BLOCK_C, 0), 1)  # 0: the tile is past the steer's columns
        d_begin = split * k_tiles_per_split * BLOCK_K
        d_end = tl.minimum(D, d_begin + k_tiles_per_split * BLOCK_K)
        d_stop = d_begin + tl.maximum(d_end - d_begin, 0) * live
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for k0 in range(d_begin, d_stop, BLOCK_K):
            ks = k0 + offs_k
            kmask = ks < d_end
            ks64 = ks.to(tl.int64)
            h = tl.load(h_ptr + rows[:, None] * stride_hb + ks64[None, :] * stride_hd,
                        mask=pmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(down_ptr + ks64[:, None] * stride_dd + cols64[None, :] * stride_dc,
                        mask=kmask[:, None] & wmask[None, :], other=0.0)
            acc = _mma(h, w, acc, NATIVE, A_SPLIT, B_SPLIT, UPCAST)
        dims = (cols // tl.maximum(rank, 1)).to(tl.int64)
        scale = tl.load(vals_ptr + rows[:, None] * stride_vb + slots[:, None] * stride_vs + dims[None, :] * stride_vk,
                        mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        coef = tl.where(scale != 0, acc * scale, 0.0)  # exact zeros where the value is zero (no 0 * inf)
        tl.store(coef_ptr + split * stride_cs + pairs[:, None] * stride_cp + cols[None, :], coef,
                 mask=pmask[:, None] & (cols < kr16)[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _gexpand_kernel(
    h_ptr, up_ptr, cols_ptr, keys_ptr, order_ptr, chunk_ptr, count_ptr, rs_ptr, coef_ptr, out_ptr, ypart_ptr,
    P, S, N, D, n_dtiles, nprog,
    stride_hb, stride_hd, stride_ur, stride_ud, stride_cn, stride_rb, stride_rs, stride_cs, stride_cp,
    stride_ob, stride_od, stride_ys, stride_yb,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HILO: tl.constexpr, B_SPLIT: tl.constexpr, UPCAST: tl.constexpr, MULTI: tl.constexpr,
):
    """Work item (chunk, D tile): acc = sum_splits(coef)[pairs, :K*r] @ up[up_start:up_start + K*r,
    D tile]. Rows naming exactly one steer are finished here (out = h + acc); the pairs of rows
    naming several write acc to ypart[slot, row] for the finalize (MULTI: S > 1, else no row can)."""
    n_items = tl.load(count_ptr) * n_dtiles
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    for item in range(tl.program_id(0), n_items, nprog):
        dtile = item % n_dtiles
        start = tl.load(chunk_ptr + item // n_dtiles)
        _, kr, _, up_start, pairs, pmask, rows, slots = _chunk(start, keys_ptr, order_ptr, cols_ptr, P, S,
                                                               stride_cn, BLOCK_M)
        kr16 = (kr + 15) // 16 * 16
        dcols = dtile * BLOCK_D + offs_d
        dmask = dcols < D
        dcols64 = dcols.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, kr, BLOCK_R):
            cols = r0 + offs_r
            a_ptrs = coef_ptr + pairs[:, None] * stride_cp + cols[None, :]
            a_mask = pmask[:, None] & (cols < kr16)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            for s in tl.static_range(1, SPLIT_K):  # fixed order: deterministic
                a += tl.load(a_ptrs + s * stride_cs, mask=a_mask, other=0.0)
            ups = (up_start + cols).to(tl.int64)
            w = tl.load(up_ptr + ups[:, None] * stride_ur + dcols64[None, :] * stride_ud,
                        mask=(cols < kr)[:, None] & dmask[None, :], other=0.0)
            if HILO:
                a_hi = a.to(tl.bfloat16)
                a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
                acc = _mma(a_lo, w, acc, True, False, False, UPCAST)
                acc = _mma(a_hi, w, acc, True, False, False, UPCAST)
            else:
                acc = _mma(a, w, acc, False, True, B_SPLIT, UPCAST)
        used = _slots_used(rs_ptr, rows, pmask, S, N, stride_rb, stride_rs)
        single = pmask & (used == 1)
        smask = single[:, None] & dmask[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_hb + dcols64[None, :] * stride_hd, mask=smask, other=0.0)
        res = (h.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_ob + dcols64[None, :] * stride_od, res, mask=smask)
        if MULTI:
            tl.store(ypart_ptr + slots[:, None] * stride_ys + rows[:, None] * stride_yb + dcols64[None, :], acc,
                     mask=(pmask & (used > 1))[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _gfinal_kernel(
    h_ptr, rs_ptr, ypart_ptr, out_ptr,
    B, S, N, D,
    stride_hb, stride_hd, stride_rb, stride_rs, stride_ys, stride_yb, stride_ob, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows naming no steer: out = h (bit for bit); rows naming several: out = h + the sum of their
    slots' ypart in slot order; rows naming one: untouched (the expand finished them)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < B
    dmask = dcols < D
    rows64 = rows.to(tl.int64)
    dcols64 = dcols.to(tl.int64)
    used = _slots_used(rs_ptr, rows64, rmask, S, N, stride_rb, stride_rs)
    multi = rmask & (used > 1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for q in range(0, S):  # fixed order: deterministic
        v = tl.load(rs_ptr + rows64 * stride_rb + q * stride_rs, mask=multi, other=-1).to(tl.int64)
        take = multi & (v >= 0) & (v < N)
        acc += tl.load(ypart_ptr + q * stride_ys + rows64[:, None] * stride_yb + dcols64[None, :],
                       mask=take[:, None] & dmask[None, :], other=0.0)
    omask = (rmask & (used != 1))[:, None] & dmask[None, :]
    h = tl.load(h_ptr + rows64[:, None] * stride_hb + dcols64[None, :] * stride_hd, mask=omask, other=0.0)
    res = (h.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
    res = tl.where(multi[:, None], res, h.to(out_ptr.dtype.element_ty))  # unsteered rows: h, bit for bit
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
    """Launch shape, chosen from host-known sizes only, never from tensor contents. Stages None: as
    many as fit two programs per SM (at most _MAX_STAGES); a number: used as is."""

    block_m: int  # pairs per chunk (rows of every shrink/expand tile)
    block_c: int  # steer columns per shrink item
    block_k: int  # D step of the shrink's loop
    split_k: int  # shrink items along D (partials summed by the expand)
    block_d: int  # D columns per expand item
    block_r: int  # K*r step of the expand's loop
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int | None = None
    expand_stages: int | None = None
    programs_per_sm: int = 2  # persistent grid: this many programs per SM (at most the items)


_MAX_STAGES = 6
_SMEM_RESERVE = 1024 + 8192  # per program: the driver's 1 KB plus room for epilogue layout conversions
_PLAN_BLOCK_P = 1024
_PLAN_WARPS = 4
_FIN_BLOCK_M = 16
_FIN_BLOCK_D = 128
_FIN_WARPS = 4
_SMALL_WEIGHTS = 2 << 20  # bytes of one steer's down (or up) under which the op is launch-latency bound
_SPLIT_K = 8  # the split over D for 16-pair chunks (half of it for bigger ones): one extra variant per bucket
# Pair buckets: (most pairs, BLOCK_M, expand BLOCK_D). Few buckets, few compiled variants.
_BUCKETS = ((16, 16, 64), (32, 32, 128), (1 << 62, 64, 128))


def _stage_budget(target: _Target) -> int:
    """Shared memory for one program's pipeline buffers: two programs per SM."""
    return min(target.smem_per_block, target.smem_per_sm // 2) - _SMEM_RESERVE


def _auto_stages(stage_bytes: int, target: _Target) -> int:
    """Pipeline depth: Triton keeps (stages - 1) tiles in shared memory."""
    return max(2, min(_MAX_STAGES, 1 + _stage_budget(target) // max(1, stage_bytes)))


def _shrink_stage_bytes(cfg: _Config, h_size: int, w_size: int) -> int:
    return cfg.block_k * (cfg.block_m * h_size + cfg.block_c * w_size)


def _expand_stage_bytes(cfg: _Config, w_size: int) -> int:
    return cfg.block_r * (cfg.split_k * cfg.block_m * 4 + cfg.block_d * w_size)


@functools.lru_cache(maxsize=4096)
def _pick_config(p: int, d: int, max_cols: int, target: _Target, h_size: int = 2, w_size: int = 2,
                 col_align: int = 16, multi: bool = False) -> _Config:
    """Heuristic tiles (estimates until a GPU sweep says otherwise) for P = B*S pairs, hidden size
    D, a bank whose largest steer spans max_cols = K*r columns, h_size/w_size bytes per element of
    h and the weights, and steers' columns aligned to col_align elements.

    BLOCK_M from P's bucket. Shrink: BLOCK_C = 2*BLOCK_M (every column tile reads the chunk's h
    rows again). If one steer on every
    row would give fewer items than 3/4 of the SMs, split over D into 8 (its partials are re-read
    by every D tile of the expand: only for 16 pairs or fewer, or weights of 2 MB or less, where
    the op is latency bound anyway), and narrow BLOCK_C to BLOCK_M. fp32 weights take shorter
    tiles (their tf32 hi/lo splits need the registers); rows that cannot load in 16-byte vectors
    32-deep ones. multi (S > 1, rows may name several steers): 64x32 expand steps for 64-pair
    chunks. Expand: 8 warps from 32-pair chunks or a split over D on (4 spill registers)."""
    block_m, block_d = next((m, bd) for top, m, bd in _BUCKETS if p <= top)
    enough = (3 * target.num_sms) // 4
    stage_cap = _stage_budget(target) // 2  # three stages at least
    block_c = 2 * block_m  # not narrowed for small steers: masked columns cost no bytes, and variants add up
    chunks = triton.cdiv(p, block_m)
    split_k = 1
    if chunks * triton.cdiv(max_cols, block_c) < enough:
        small = d * max_cols * w_size <= _SMALL_WEIGHTS
        split = _SPLIT_K if block_m == 16 else _SPLIT_K // 2  # 4 for bigger chunks: the expand's registers
        if (p <= 16 or small) and d >= 2 * 64 * split:
            split_k = split
        block_c = max(16, min(block_c, block_m))
    block_k = 64 if split_k > 1 or w_size == 4 else 256 if block_m == 16 else 128
    if w_size == 4 and block_m == 64:
        block_k = 32
    if col_align * w_size < 16 or d % (16 // h_size):
        block_k = 32
    while block_k > 32 and block_k * (block_m * h_size + block_c * w_size) > stage_cap:
        block_k //= 2
    if split_k > 1:
        block_d = 64 if block_m == 64 else 128
    block_r = 32 if w_size == 4 or (split_k > 1 and block_m == 64) else 64
    if w_size == 4 and block_m >= 32:  # fp32 weights: the tf32 splits of both operands need the registers
        block_d = 64
    if multi and (block_m == 64 or split_k > 1):  # S > 1: the expand's second (fp32 partial) store too
        block_d, block_r = min(block_d, 64 if block_m == 64 else 128), 32
    while block_r > 16 and block_r * (split_k * block_m * 4 + block_d * w_size) > stage_cap:
        block_r //= 2
    return _Config(block_m, block_c, block_k, split_k, block_d, block_r,
                   shrink_warps=8 if block_m * block_c >= 64 * 64 else 4,
                   expand_warps=8 if block_m >= 32 or split_k > 1 else 4)


@dataclass(frozen=True)
class _Launch:
    """One kernel launch: the JIT function, its grid, positional arguments and keywords
    (constexprs and num_warps/num_stages). `key` names the compiled variant it needs (batch sizes,
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


def _col_align(down: torch.Tensor, layout: GatherLayout) -> int:
    """COL_ALIGN: 16 bytes' worth of elements if that divides every down_start, down's width and its
    row stride (vector loads), else 1 (two values: fewer compiled variants)."""
    full = 16 // down.element_size()
    return full if _pow2_divisor(layout.start_align, down.shape[1], down.stride(0), cap=full) == full else 1


def _plan(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor,
          row_steer: torch.Tensor, row_values: torch.Tensor, out: torch.Tensor, layout: GatherLayout,
          cfg: _Config, target: _Target, interpret: bool) -> list[_Launch]:
    """Sort the pairs (a torch op, queued on hidden's stream) and return the kernel launches for
    one call. `meta` tensors give the plan without memory (how the compile test and
    `variant_keys` enumerate the variants).

    hidden [B, D], down [D, C], up [U, D], cols [N, 4], row_steer [B, S], row_values [B, S, Kmax],
    out [B, D]; scratch: keys [P] (sorted row_steer) and order [P] int64 (their flat (row, slot)
    indices), chunk starts [P] and their count [1] int32, coef [split_k, P, W16] fp32 (W16 =
    max_cols rounded up to 16) and, for S > 1, ypart [S, B, D16] fp32."""
    b, d = hidden.shape
    s = row_steer.shape[1]
    p, n = b * s, cols.shape[0]
    dev = hidden.device
    h_size, w_size = hidden.element_size(), down.element_size()
    native = hidden.dtype == down.dtype and hidden.dtype in _HALF
    hilo = up.dtype == torch.bfloat16 and hidden.dtype in _HALF
    upcast = interpret and (hidden.dtype == torch.bfloat16 or up.dtype == torch.bfloat16)
    col_align = _col_align(down, layout)
    programs = max(1, cfg.programs_per_sm * target.num_sms)
    chunks_max = max(1, min(p, triton.cdiv(p, cfg.block_m) + min(n, p)))

    keys, order = torch.sort(row_steer.reshape(p), stable=True)
    chunk = torch.empty((max(p, 1),), dtype=torch.int32, device=dev)
    count = torch.empty((1,), dtype=torch.int32, device=dev)
    w16 = _round_up(max(layout.max_cols, 1), 16)
    coef = torch.empty((cfg.split_k, p, w16), dtype=torch.float32, device=dev)
    if s > 1:
        ypart = torch.empty((s, b, _round_up(d, 16)), dtype=torch.float32, device=dev)
        ys, yb = ypart.stride(0), ypart.stride(1)
    else:  # no row names two steers: never written or read
        ypart, ys, yb = coef, 0, 0

    launches = [_Launch(_plan_kernel, (1, 1, 1), (keys, chunk, count, p, n, max(1, p.bit_length())),
                        dict(BLOCK_M=cfg.block_m, BLOCK_P=_PLAN_BLOCK_P, num_warps=_PLAN_WARPS, num_stages=1))]

    n_tiles = triton.cdiv(max(layout.max_cols, 1), cfg.block_c)
    k_tiles_per_split = triton.cdiv(triton.cdiv(d, cfg.block_k), cfg.split_k)
    grid = min(programs, chunks_max * n_tiles * cfg.split_k)
    shrink_stages = cfg.shrink_stages or _auto_stages(_shrink_stage_bytes(cfg, h_size, w_size), target)
    launches.append(_Launch(
        _gshrink_kernel, (grid, 1, 1),
        (hidden, down, cols, keys, order, chunk, count, row_values, coef,
         p, s, d, n_tiles, k_tiles_per_split, grid,
         hidden.stride(0), hidden.stride(1), down.stride(0) // col_align, down.stride(1), cols.stride(0),
         row_values.stride(0), row_values.stride(1), row_values.stride(2), coef.stride(0), coef.stride(1)),
        dict(BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, COL_ALIGN=col_align,
             NATIVE=native, A_SPLIT=not native and hidden.dtype == torch.float32,
             B_SPLIT=not native and down.dtype == torch.float32, UPCAST=upcast and native,
             num_warps=cfg.shrink_warps, num_stages=shrink_stages),
    ))

    n_dtiles = triton.cdiv(d, cfg.block_d)
    grid = min(programs, chunks_max * n_dtiles)
    expand_stages = cfg.expand_stages or _auto_stages(_expand_stage_bytes(cfg, up.element_size()), target)
    launches.append(_Launch(
        _gexpand_kernel, (grid, 1, 1),
        (hidden, up, cols, keys, order, chunk, count, row_steer, coef, out, ypart,
         p, s, n, d, n_dtiles, grid,
         hidden.stride(0), hidden.stride(1), up.stride(0), up.stride(1), cols.stride(0),
         row_steer.stride(0), row_steer.stride(1), coef.stride(0), coef.stride(1),
         out.stride(0), out.stride(1), ys, yb),
        dict(SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r, HILO=hilo,
             B_SPLIT=not hilo and up.dtype == torch.float32, UPCAST=upcast and hilo, MULTI=s > 1,
             num_warps=cfg.expand_warps, num_stages=expand_stages),
    ))
    launches.append(_Launch(
        _gfinal_kernel, (triton.cdiv(b, _FIN_BLOCK_M), triton.cdiv(d, _FIN_BLOCK_D), 1),
        (hidden, row_steer, ypart, out, b, s, n, d,
         hidden.stride(0), hidden.stride(1), row_steer.stride(0), row_steer.stride(1), ys, yb,
         out.stride(0), out.stride(1)),
        dict(BLOCK_M=_FIN_BLOCK_M, BLOCK_D=_FIN_BLOCK_D, num_warps=_FIN_WARPS, num_stages=1),
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


def _default_config(hidden: torch.Tensor, down: torch.Tensor, row_steer: torch.Tensor, layout: GatherLayout,
                    target: _Target) -> _Config:
    b, d = hidden.shape
    return _pick_config(b * row_steer.shape[1], d, layout.max_cols, target, hidden.element_size(),
                        down.element_size(), _col_align(down, layout), row_steer.shape[1] > 1)


def _check(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, row_steer: torch.Tensor,
           row_values: torch.Tensor, out: torch.Tensor | None, layout: GatherLayout) -> None:
    """Shape/dtype/device checks: metadata and the host-side layout only, no device synchronisation."""
    if hidden.dim() != 2 or down.dim() != 2 or up.dim() != 2 or cols.dim() != 2 or row_steer.dim() != 2 \
            or row_values.dim() != 3:
        raise ValueError("expected hidden [B, D], down [D, C], up [U, D], cols [N, 4], row_steer [B, S], "
                         "row_values [B, S, Kmax]")
    b, d = hidden.shape
    if down.shape[0] != d or up.shape[1] != d or cols.shape[1] != 4 or row_steer.shape[0] != b \
            or tuple(row_values.shape[:2]) != tuple(row_steer.shape) or cols.shape[0] != layout.num_steers:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)}, cols {tuple(cols.shape)} ({layout.num_steers} steers in the layout), "
                         f"row_steer {tuple(row_steer.shape)}, row_values {tuple(row_values.shape)}")
    if layout.dense:
        raise ValueError("the Triton gather kernel needs every steer factored (up_start >= 0); this bank stores "
                         "some dense (SteerBank.pack(..., dense=False) on CUDA)")
    if row_values.shape[2] < layout.max_dims:
        raise ValueError(f"row_values has {row_values.shape[2]} dims per slot, a steer has {layout.max_dims}")
    if hidden.dtype not in (*_HALF, torch.float32) or down.dtype not in (*_HALF, torch.float32) \
            or up.dtype not in (*_HALF, torch.float32):
        raise TypeError("hidden, down and up must be bf16, fp16 or fp32")
    if not row_values.is_floating_point() or cols.dtype not in (torch.int32, torch.int64) \
            or row_steer.dtype not in (torch.int32, torch.int64):
        raise TypeError("row_values must be floating point, cols and row_steer int32/int64")
    tensors = [down, up, cols, row_steer, row_values] + ([out] if out is not None else [])
    if any(t.device != hidden.device for t in tensors):
        raise ValueError("all tensors must be on hidden's device")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype):
        raise ValueError("out must have hidden's shape and dtype")


def steer_hidden_gather_triton(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    cols: torch.Tensor,
    row_steer: torch.Tensor,
    row_values: torch.Tensor,
    out: torch.Tensor | None = None,
    layout: GatherLayout | None = None,
    cfg: _Config | None = None,
) -> torch.Tensor:
    """Every row of hidden steered by the steers it names, with fp32 accumulation; the semantics of
    `steer_hidden_gather_torch` (see the module docstring for the kernels).

    hidden [B, D] bf16/fp16/fp32 (any strides); down [D, C] and up [U, D] in hidden's dtype or
    another of those; cols [N, 4] int (down_start, K, r, up_start >= 0 per steer); row_steer [B, S]
    int (bank index per slot, -1 none); row_values [B, S, Kmax] float (eps folded in). Rows naming
    no steer are copied unchanged. `out` (hidden's shape and dtype) may be given, also `out=hidden`
    for an in-place update (every output element is written by the one program that read that
    element of hidden, after the shrink has finished with hidden). `layout`: the bank's host-side
    facts (`GatherLayout.of` its cols as host integers); None reads cols back from the device,
    which synchronises: for tests and benchmarks only, serving passes the bank's. `cfg`: an
    explicit launch config (tests and the benchmark's sweep), None the heuristic's.
    """
    if layout is None:
        layout = GatherLayout.of(cols.tolist())
    _check(hidden, down, up, cols, row_steer, row_values, out, layout)
    if out is None:
        out = torch.empty_like(hidden)
    b, d = hidden.shape
    if b == 0 or d == 0:
        return out
    if row_steer.shape[1] == 0 or layout.max_cols == 0:
        return out.copy_(hidden)
    target = _target_for(hidden)
    cfg = cfg or _default_config(hidden, down, row_steer, layout, target)
    if hidden.is_cuda:
        with torch.cuda.device(hidden.device):
            _run(_plan(hidden, down, up, cols, row_steer, row_values, out, layout, cfg, target, _interpreting()))
    else:
        _run(_plan(hidden, down, up, cols, row_steer, row_values, out, layout, cfg, target, _interpreting()))
    return out


def _warm_inputs(down: torch.Tensor, b: int, s: int, max_dims: int,
                 hidden_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, row_steer, row_values, out) for a warm-up launch on down's device: zeros, every slot
    of every row on steer 0 (so that every kernel runs its main loops once)."""
    dev = down.device
    hidden = torch.zeros((b, down.shape[0]), dtype=hidden_dtype, device=dev)
    row_steer = torch.zeros((b, s), dtype=torch.int32, device=dev)
    row_values = torch.zeros((b, s, max(1, max_dims)), dtype=torch.float32, device=dev)
    return hidden, row_steer, row_values, torch.empty_like(hidden)


def _variants(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, layout: GatherLayout, max_dims: int,
              max_batch: int, max_steers: int, hidden_dtype: torch.dtype, target: _Target):
    """(batch, slots, launch keys) of the first batch shape that needs each new set of variants
    (the keys follow from the config and S > 1: one plan, on meta tensors, per distinct pair)."""
    configs: set[tuple[_Config, bool]] = set()
    meta_down = torch.empty_strided(down.shape, down.stride(), dtype=down.dtype, device="meta")
    meta_up = torch.empty_strided(up.shape, up.stride(), dtype=up.dtype, device="meta")
    meta_cols = torch.empty_strided(cols.shape, cols.stride(), dtype=cols.dtype, device="meta")
    for s in range(1, max_steers + 1):
        for b in range(1, max_batch + 1):
            hidden, row_steer, row_values, out = _warm_inputs(meta_down, b, s, max_dims, hidden_dtype)
            cfg = _default_config(hidden, meta_down, row_steer, layout, target)
            if (cfg, s > 1) in configs:  # the config and S > 1 (MULTI) make the keys
                continue
            configs.add((cfg, s > 1))
            yield b, s, [launch.key for launch in _plan(hidden, meta_down, meta_up, meta_cols, row_steer, row_values,
                                                        out, layout, cfg, target, _interpreting())]


def warm_up(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, max_dims: int, max_batch: int,
            max_steers: int, hidden_dtype: torch.dtype, layout: GatherLayout | None = None) -> int:
    """Compile (by launching once, on zeros) every kernel variant `steer_hidden_gather_triton` can
    launch with this bank for batches of 1..max_batch rows of hidden_dtype naming 1..max_steers
    steers each, so that none compiles while serving; returns how many distinct variants that is.
    down [D, C], up [U, D], cols [N, 4] as in `steer_hidden_gather_triton`; `layout` None reads
    cols back (a synchronisation, fine at start-up)."""
    if max_batch <= 0 or max_steers <= 0 or down.shape[0] == 0:
        return 0
    layout = layout or GatherLayout.of(cols.tolist())
    if layout.max_cols == 0:
        return 0
    target = _target_for(down)
    seen: set[tuple] = set()
    for b, s, keys in _variants(down, up, cols, layout, max_dims, max_batch, max_steers, hidden_dtype, target):
        if all(k in seen for k in keys):
            continue
        seen.update(keys)
        hidden, row_steer, row_values, out = _warm_inputs(down, b, s, max_dims, hidden_dtype)
        steer_hidden_gather_triton(hidden, down, up, cols, row_steer, row_values, out=out, layout=layout)
    return len(seen)


def variant_keys(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, max_dims: int, max_batch: int,
                 max_steers: int, hidden_dtype: torch.dtype, target: _Target,
                 layout: GatherLayout | None = None) -> set[tuple]:
    """The variant keys `warm_up` compiles for `target` (planned on meta tensors, no memory; down,
    up and cols may be meta tensors too when `layout` is given)."""
    layout = layout or GatherLayout.of(cols.tolist())
    keys: set[tuple] = set()
    if max_batch <= 0 or max_steers <= 0 or down.shape[0] == 0 or layout.max_cols == 0:
        return keys
    for _, _, ks in _variants(down, up, cols, layout, max_dims, max_batch, max_steers, hidden_dtype, target):
        keys.update(ks)
    return keys
