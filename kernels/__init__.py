"""The steer op, h -> h + delta(h, per-row steers), as Triton kernels for CUDA and plain torch beside
them. `steer_hidden_gather` picks the right one for the tensors' device."""

import torch

from .layout import GatherLayout
from .steer_torch import steer_hidden_bags_torch, steer_hidden_gather_torch

__all__ = ["GatherLayout", "steer_hidden_bags_torch", "steer_hidden_gather", "steer_hidden_gather_torch", "warm_up"]


def steer_hidden_gather(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    cols: torch.Tensor,
    row_steer: torch.Tensor,
    row_values: torch.Tensor,
    layout: GatherLayout | None = None,
) -> torch.Tensor:
    """Steer every row of `hidden` by the steers it names (per-row gather): the Triton kernel on
    CUDA, torch elsewhere (embedding bags if `down` is flat). See `steer_hidden_gather_torch` for
    the argument layout and `steer_hidden_bags_torch` for the flat one. `layout`: the
    bank's host-side facts (`GatherLayout.of`), which the CUDA path needs to launch without reading
    `cols` back from the device; None there costs a synchronisation."""
    if hidden.is_cuda:
        from .triton_ops import steer_hidden_gather_triton

        return steer_hidden_gather_triton(hidden, down, up, cols, row_steer, row_values, layout=layout)
    if down.dim() == 1:
        return steer_hidden_bags_torch(hidden, down, up, cols, row_steer, row_values)
    return steer_hidden_gather_torch(hidden, down, up, cols, row_steer, row_values)


def warm_up(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, max_dims: int, max_batch: int,
            max_steers: int, hidden_dtype: torch.dtype, layout: GatherLayout | None = None) -> int:
    """Compile every kernel variant `steer_hidden_gather` can launch for batches of 1..max_batch rows
    of `hidden_dtype`, each naming up to `max_steers` steers of up to `max_dims` dims, with these
    weights; nothing to do off CUDA. Returns how many variants were launched."""
    if not down.is_cuda:
        return 0
    from .triton_ops import warm_up as warm_up_triton

    return warm_up_triton(down, up, cols, max_dims=max_dims, max_batch=max_batch, max_steers=max_steers,
                          hidden_dtype=hidden_dtype, layout=layout)
