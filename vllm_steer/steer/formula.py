"""The steer's math, in one place: the LM-Steer formula on a steer's projectors, each dim's matrix
W_k, and the low-rank bank that packs many steers for batched serving. Pure torch, no vLLM.

    h' = h + eps * sum_k s_k (h @ P1_k) @ P2_k^T  =  h (I + eps * sum_k s_k W_k),  W_k = P1_k P2_k^T

Training, interpretation, transfer and composition use `steered_hidden` and `dim_matrices`;
serving packs the steers into a `SteerBank` and runs the packed op from `vllm_steer.kernels`
(the torch op or the Triton kernel), which the tests check against `steered_hidden`.
"""

from __future__ import annotations

import torch

from vllm_steer.kernels import steer_hidden, steer_hidden_dense_torch, warm_up

from .file import SteerFile, SteerHeader


def steered_hidden(hidden: torch.Tensor, values: torch.Tensor, projector1: torch.Tensor, projector2: torch.Tensor,
                   epsilon: float) -> torch.Tensor:
    """h + eps * sum_k s_k (h @ P1_k) @ P2_k^T for every row, in the reference's order and in
    the inputs' dtype (differentiable: training uses it).

    hidden [N, D]; values [N, K] (each row's s); projector1, projector2 [K, D, r].
    """
    k, d, r = projector1.shape
    shrunk = hidden @ projector1.permute(1, 0, 2).reshape(d, k * r)  # [N, K*r]: every h @ P1_k side by side
    shrunk = shrunk * values.repeat_interleave(r, dim=1)
    return hidden + epsilon * (shrunk @ projector2.permute(0, 2, 1).reshape(k * r, d))


def dim_matrices(projector1: torch.Tensor, projector2: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_k = P1_k @ P2_k^T for every dim, [K, D, D], computed in `dtype`.

    projector1, projector2 [K, D, r].
    """
    return projector1.to(dtype) @ projector2.to(dtype).transpose(1, 2)


class SteerBank:
    """The named steers' dimensions packed side by side: K_total = sum of each steer's K, and
    R = sum over all dims of that steer's rank.

    down [D, R] holds every P1_k side by side, up [R, D] every P2_k^T stacked, and
    col_dim [R] says which of the K_total dims each column belongs to. A row's values
    are a [K_total] vector with each steer's eps folded in, so all-zero means unsteered.
    Off CUDA, where the torch op runs, `dense` [D, K_total * D] holds every W_k = P1_k P2_k^T
    instead when that is cheaper (one GEMM of D x K_total*D rather than two of D x R).
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
        self.dense: torch.Tensor | None = None
        self.placement: tuple[torch.device, torch.dtype] | None = None  # set by to()

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

    @property
    def dense_is_cheaper(self) -> bool:
        """D * K_total multiply-adds per row for the dense form against 2 * D * R for the factors."""
        return self.num_dims * self.hidden_size < 2 * self.total_rank

    def dense_weights(self) -> torch.Tensor:
        """[D, K_total * D]: W_k for every dim k side by side, computed in float64."""
        blocks = [dim_matrices(self.down[None, :, self.col_dim == k], self.up[None, self.col_dim == k].mT,
                               torch.float64)[0] for k in range(self.num_dims)]
        return torch.cat(blocks, dim=1).float()

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> SteerBank:
        """Move the basis (not the bookkeeping) to a device, in the dtype the op reads."""
        device = torch.device(device)
        if device.type != "cuda" and self.dense_is_cheaper:
            self.dense = self.dense_weights().to(device, dtype)
        self.down = self.down.to(device, dtype)
        self.up = self.up.to(device, dtype)
        self.col_dim = self.col_dim.to(device)
        self.placement = (device, dtype)
        return self

    def warm_up(self, max_rows: int, hidden_dtype: torch.dtype) -> int:
        """Compile every kernel variant `steer` can launch for 1..max_rows rows of this dtype (on
        CUDA; nothing to compile elsewhere). Returns how many variants ran."""
        if self.dense is not None:
            return 0
        return warm_up(self.down, self.up, self.col_dim, self.num_dims, max_rows, hidden_dtype)

    def steer(self, hidden: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
        """Every row of `hidden` steered with its own [K_total] values (the bank on its device)."""
        if self.dense is not None:
            return steer_hidden_dense_torch(hidden, self.dense, row_values)
        return steer_hidden(hidden, self.down, self.up, self.col_dim, row_values)
