"""The gather op's Triton kernels (CUDA; Triton's interpreter in the tests), one launch each per step:
`plan_kernel` cuts the steer-sorted (row, slot) pairs into chunks, `shrink_kernel` and `expand_kernel`
(persistent) compute each chunk's h @ P1 and @ P2^T over its steer's weights only, `finalize_kernel`
copies unsteered rows and sums rows composing several steers; plus the exact-product dot (`_mma`) they
share. Launched by gather_op.py; the design is in docs/kernel.md."""

from __future__ import annotations

import triton
import triton.language as tl

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
    """acc + a @ b, every product exact in fp32 (see docs/kernel.md). NATIVE: a and b share
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
def plan_kernel(keys_ptr, chunk_ptr, count_ptr, P, N, log_p, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
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
def shrink_kernel(
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
def expand_kernel(
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
def finalize_kernel(
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
