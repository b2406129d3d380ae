"""The steer op, h -> h + delta(h, per-row values), as a fused Triton kernel for CUDA and a
plain torch version beside it. `steer_hidden` picks the right one for the tensor's device."""

import torch

from .steer_torch import steer_hidden_dense_torch, steer_hidden_torch

__all__ = ["steer_hidden", "steer_hidden_dense_torch", "steer_hidden_torch"]


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
