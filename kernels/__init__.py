"""The steer op, h -> h + delta(h, per-row values), as a fused Triton kernel for CUDA and a
plain torch version beside it. `steer_hidden` picks the right one for the tensor's device."""

import torch

from .steer_torch import steer_hidden_dense_torch, steer_hidden_torch

__all__ = ["steer_hidden", "steer_hidden_dense_torch", "steer_hidden_torch", "warm_up"]


def steer_hidden(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    col_dim: torch.Tensor,
    row_values: torch.Tensor,
) -> torch.Tensor:
    """Steer every row of `hidden` with its own values: the Triton kernel on CUDA, torch
    elsewhere. See `steer_hidden_torch` for the argument layout."""
    if hidden.is_cuda:
        from .steer_triton import steer_hidden_triton

        return steer_hidden_triton(hidden, down, up, col_dim, row_values)
    return steer_hidden_torch(hidden, down, up, col_dim, row_values)


def warm_up(down: torch.Tensor, up: torch.Tensor, col_dim: torch.Tensor, num_dims: int, max_batch: int,
            hidden_dtype: torch.dtype) -> int:
    """Compile every kernel variant `steer_hidden` can launch for batches of 1..max_batch rows of
    `hidden_dtype` with these weights (down [D, R], up [R, D], col_dim [R]); nothing to do off CUDA.
    Returns how many variants were launched."""
    if not down.is_cuda:
        return 0
    from .steer_triton import warm_up as warm_up_triton

    return warm_up_triton(hidden_size=down.shape[0], total_rank=down.shape[1], num_dims=num_dims,
                          hidden_dtype=hidden_dtype, weight_dtype=down.dtype, max_batch=max_batch, device=down.device)
