"""The steer op as Triton kernels for CUDA: h'_b = h_b + ((h_b @ down) * v_b[col_dim]) @ up.

Two launches, deterministic (no atomics), fp32 accumulation:
1. shrink: t[b, c] = (h_b . down[:, c]) * row_values[b, col_dim[c]], written to an fp32
   scratch [B, R]. Grid: (row blocks, column blocks of R), so `down` is read once per row
   block.
2. expand: out[b, :] = h_b + t[b, :] @ up. Grid: (row blocks, blocks of D), so `up` is read
   once per row block; the residual add is fused in.
Fusing both into one launch would need either a grid-wide reduction over R (atomics, not
run-to-run deterministic) or every program re-reading all of `down`; two launches keep each
weight read once and the result bit-stable. At decode, B is a single row block, so P1 and P2
are each read exactly once: the op's memory floor.

A row whose values are all zero is detected in-kernel (no host sync) and copied through
unchanged, bit-identical; a row block with no steered row skips its matmuls.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _row_flags(values_ptr, rows, row_mask, num_dims, stride_v, BLOCK_K: tl.constexpr):
    """1 for rows with any nonzero value, else 0."""
    flags = tl.zeros_like(rows).to(tl.int32)
    for k0 in range(0, num_dims, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(values_ptr + rows[:, None] * stride_v + ks[None, :],
                    mask=row_mask[:, None] & (ks[None, :] < num_dims), other=0.0)
        flags = flags | tl.max((v != 0).to(tl.int32), axis=1)
    return flags


@triton.jit
def _shrink_kernel(h_ptr, down_ptr, col_dim_ptr, values_ptr, t_ptr,
                   B, D, R, num_dims,
                   stride_hb, stride_dd, stride_vb, stride_tb,
                   BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                   NATIVE_DOT: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    col_mask = cols < R
    flags = _row_flags(values_ptr, rows, row_mask, num_dims, stride_vb, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    if tl.max(flags, axis=0) > 0:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_hb + ds[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(down_ptr + ds[:, None] * stride_dd + cols[None, :],
                        mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            if NATIVE_DOT:  # bf16/fp16 operands, fp32 accumulation on tensor cores
                acc += tl.dot(h, w, out_dtype=tl.float32)
            else:
                acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        dims = tl.load(col_dim_ptr + cols, mask=col_mask, other=0)
        scale = tl.load(values_ptr + rows[:, None] * stride_vb + dims[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc = acc * scale
    tl.store(t_ptr + rows[:, None] * stride_tb + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _expand_kernel(h_ptr, up_ptr, t_ptr, values_ptr, out_ptr,
                   B, D, R, num_dims,
                   stride_hb, stride_ur, stride_tb, stride_vb, stride_ob,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   NATIVE_DOT: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    d_mask = ds < D
    mask = row_mask[:, None] & d_mask[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_hb + ds[None, :], mask=mask, other=0.0)
    flags = _row_flags(values_ptr, rows, row_mask, num_dims, stride_vb, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if tl.max(flags, axis=0) > 0:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_mask = rs < R
            t = tl.load(t_ptr + rows[:, None] * stride_tb + rs[None, :],
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            w = tl.load(up_ptr + rs[:, None] * stride_ur + ds[None, :],
                        mask=r_mask[:, None] & d_mask[None, :], other=0.0)
            if NATIVE_DOT:
                acc += tl.dot(t.to(w.dtype), w, out_dtype=tl.float32)
            else:
                acc += tl.dot(t, w.to(tl.float32), input_precision="ieee")
    steered = (h.to(tl.float32) + acc).to(h.dtype)
    # Unsteered rows: the input itself, not input + 0.0 rounded through fp32.
    out = tl.where((flags > 0)[:, None], steered, h)
    tl.store(out_ptr + rows[:, None] * stride_ob + ds[None, :], out, mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def steer_hidden_triton(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    col_dim: torch.Tensor,
    row_values: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `steer_hidden_torch`; `out` may be preallocated (it may not alias
    `hidden`: other programs still read `hidden` while one writes its block)."""
    B, D = hidden.shape
    R = down.shape[1]
    num_dims = row_values.shape[1]
    if hidden.stride(1) != 1 or down.stride(1) != 1 or up.stride(1) != 1 or row_values.stride(1) != 1:
        raise ValueError("steer_hidden_triton needs row-major (last-dim contiguous) tensors")
    if out is None:
        out = torch.empty_like(hidden)
    if B == 0:
        return out
    scratch = torch.empty(B, R, device=hidden.device, dtype=torch.float32)
    block_b = _block(B, 16, 64)  # tl.dot needs at least 16 rows; decode batches are one block
    block_k = _block(num_dims, 2, 64)
    block_r, block_d = 64, 64
    # Tensor-core dots where hidden state and weights share a half-precision dtype; exact
    # fp32 (no TF32) otherwise. Triton's CPU interpreter computes half-precision dots wrongly
    # (seen with Triton 3.9), so under it the fp32 path is taken.
    native = (hidden.dtype == down.dtype == up.dtype and hidden.dtype in (torch.bfloat16, torch.float16)
              and os.environ.get("TRITON_INTERPRET") != "1")
    _shrink_kernel[(triton.cdiv(B, block_b), triton.cdiv(R, block_r))](
        hidden, down, col_dim, row_values, scratch, B, D, R, num_dims,
        hidden.stride(0), down.stride(0), row_values.stride(0), scratch.stride(0),
        BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_K=block_k, NATIVE_DOT=native)
    _expand_kernel[(triton.cdiv(B, block_b), triton.cdiv(D, block_d))](
        hidden, up, scratch, row_values, out, B, D, R, num_dims,
        hidden.stride(0), up.stride(0), scratch.stride(0), row_values.stride(0), out.stride(0),
        BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_K=block_k, NATIVE_DOT=native)
    return out
