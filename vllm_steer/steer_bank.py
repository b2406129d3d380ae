"""Several loaded steers as one low-rank basis, so that a batch whose rows each carry
their own mix of steers is steered in a single batched op. Pure torch, no vLLM."""

from __future__ import annotations

import torch

from .steer_file import SteerFile, SteerHeader


class SteerBank:
    """The named steers' dimensions concatenated: K_total = sum of each steer's K, and
    R = sum over all dims of that steer's rank.

    down [D, R] holds every P1_k side by side, up [R, D] every P2_k^T stacked, and
    col_dim [R] says which of the K_total dims each column belongs to. A row's values
    are a [K_total] vector with each steer's eps folded in, so all-zero means unsteered.
    """

    def __init__(self, steers: dict[str, SteerFile]) -> None:
        if not steers:
            raise ValueError("a SteerBank needs at least one steer")
        sizes = {s.header.hidden_size for s in steers.values()}
        if len(sizes) != 1:
            raise ValueError(f"all steers must share one hidden size, got {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        self.headers: dict[str, SteerHeader] = {name: s.header for name, s in steers.items()}
        self.offsets: dict[str, int] = {}
        downs, ups, col_dims = [], [], []
        dim = 0
        for name, steer in steers.items():
            self.offsets[name] = dim
            for k in range(steer.header.num_dims):
                downs.append(steer.projector1[k].float())
                ups.append(steer.projector2[k].float().T)
                col_dims.append(torch.full((steer.header.rank,), dim, dtype=torch.int64))
                dim += 1
        self.num_dims = dim
        self.down = torch.cat(downs, dim=1).contiguous()
        self.up = torch.cat(ups, dim=0).contiguous()
        self.col_dim = torch.cat(col_dims)

    @property
    def total_rank(self) -> int:
        return int(self.col_dim.numel())

    def row_values(self, request: dict[str, list[float]]) -> list[float]:
        """A request's [K_total] row, eps folded in: {name: K values} -> flat list."""
        row = [0.0] * self.num_dims
        for name, values in request.items():
            header, start = self.headers[name], self.offsets[name]
            for k, value in enumerate(values):
                row[start + k] = header.epsilon * value
        return row

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> SteerBank:
        """Move the basis (not the bookkeeping) to a device, in the dtype the op reads."""
        self.down = self.down.to(device, dtype)
        self.up = self.up.to(device, dtype)
        self.col_dim = self.col_dim.to(device)
        return self
