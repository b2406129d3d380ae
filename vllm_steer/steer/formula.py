"""The steer's math, in one place: the LM-Steer formula on a steer's projectors, each dim's matrix
W_k, and the low-rank bank that packs many steers for batched serving. Pure torch, no vLLM.

    h' = h + eps * sum_k s_k (h @ P1_k) @ P2_k^T  =  h (I + eps * sum_k s_k W_k),  W_k = P1_k P2_k^T

Training, interpretation, transfer and composition use `steered_hidden` and `dim_matrices`;
serving packs the steers into a `SteerBank` and runs the per-row gather op from `vllm_steer.kernels`
(the torch op or the Triton kernel), which the tests check against `steered_hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_steer.kernels import GatherLayout, steer_hidden_gather, warm_up

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


@dataclass(frozen=True)
class BankEntry:
    """Where one steer's weights sit in a bank: `num_dims` dims of rank `rank` from column
    `down_start` of `down`, and from row `up_start` of `up` (-1: dense, W_k in `down`, rank D)."""

    down_start: int
    num_dims: int
    rank: int
    up_start: int


class SteerBank:
    """Loaded steers packed for per-row gathering: each request names a few of them, and a step
    costs what the steers its rows name cost, however many are loaded.

    `down` holds each steer's P1_k side by side (K*r columns), or, off CUDA where it is cheaper
    (r > D/2), its W_k = P1_k P2_k^T side by side (K*D columns, "dense"); up [U, D] holds the
    factored steers' P2_k^T stacked; `cols` [N, 4] (down_start, K, r, up_start per steer, in
    `names` order) says where. `down` is laid out for the op that reads it: on CUDA one row-major
    [D, C] matrix (down_start: a column), as the Triton kernel streams it; elsewhere (`bags`) a
    flat buffer of each steer's [D, K*r] block, row-major, at an element offset that is a multiple
    of K*r (down_start: that offset), as the torch op's embedding bags read it. A row's request
    is (steer index, K values with eps folded in) per steer it names: see `row_entries`.
    """

    def __init__(self, headers: dict[str, SteerHeader], blocks: list[tuple[torch.Tensor, torch.Tensor | None]],
                 rank: list[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 dense: bool = False, bags: bool | None = None) -> None:
        """From each steer's (down block [D, K*r], up block [K*r, D] or None if dense); see `pack`.
        `dense`: whether steers added later may be stored dense; `bags`: the flat layout of `down`
        (default: off CUDA)."""
        if not headers:
            raise ValueError("a SteerBank needs at least one steer")
        sizes = {h.hidden_size for h in headers.values()}
        if len(sizes) != 1:
            raise ValueError(f"all steers must share one hidden size, got {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        self.headers = dict(headers)
        self.names = list(headers)
        self.index = {name: n for n, name in enumerate(self.names)}
        self.device, self.dtype, self.dense = torch.device(device), dtype, dense
        self.bags = self.device.type != "cuda" if bags is None else bags
        self.entries: list[BankEntry] = []
        down_start = up_start = 0
        for header, (down, up), r in zip(headers.values(), blocks, rank, strict=True):
            width = down.shape[1]
            if self.bags:  # the block's offset a multiple of its width: whole rows of a [-1, width] view
                down_start = -(-down_start // width) * width
            self.entries.append(BankEntry(down_start, header.num_dims, r, -1 if up is None else up_start))
            down_start += down.numel() if self.bags else width
            up_start += 0 if up is None else up.shape[0]
        if self.bags:
            self.down = torch.zeros(down_start, device=self.device, dtype=dtype)
            for e, (down, _) in zip(self.entries, blocks, strict=True):
                self.down[e.down_start:e.down_start + down.numel()].view_as(down).copy_(down)
        else:
            self.down = torch.cat([d for d, _ in blocks], dim=1).to(self.device, dtype).contiguous()
        ups = [u for _, u in blocks if u is not None]
        self.up = (torch.cat(ups) if ups else self.down.new_zeros(0, self.hidden_size)).to(self.device, dtype)
        self.cols = torch.tensor([[e.down_start, e.num_dims, e.rank, e.up_start] for e in self.entries],
                                 dtype=torch.int64 if self.bags else torch.int32, device=self.device)
        self.max_dims = max(h.num_dims for h in headers.values())
        # The host-side facts the CUDA kernel's launch shape needs, from the entries (no device read).
        self.layout = GatherLayout.of((e.down_start, e.num_dims, e.rank, e.up_start) for e in self.entries)

    @classmethod
    def pack(cls, steers: dict[str, SteerFile], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, dense: bool | None = None, bags: bool | None = None) -> SteerBank:
        """The steers packed on `device` in `dtype`, each stored dense where that is cheaper if
        `dense` allows it, `down` in the torch op's flat layout if `bags` (both default: off CUDA,
        where the torch op runs)."""
        device = torch.device(device)
        dense = device.type != "cuda" if dense is None else dense
        blocks, ranks = [], []
        for steer in steers.values():
            k, d, r = steer.projector1.shape
            down = steer.projector1.float().permute(1, 0, 2).reshape(d, k * r)
            up = steer.projector2.float().permute(0, 2, 1).reshape(k * r, d)
            block, rank = _stored_block(down, up, k, r, dense)
            blocks.append(block)
            ranks.append(rank)
        return cls({n: s.header for n, s in steers.items()}, blocks, ranks, device, dtype, dense, bags)

    def placed(self, device: torch.device | str, dtype: torch.dtype) -> SteerBank:
        """This bank on `device` in `dtype`."""
        if (torch.device(device), dtype) == (self.device, self.dtype):
            return self
        return self.repacked(self.names, {}, device, dtype)

    def repacked(self, keep: list[str], added: dict[str, SteerFile], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> SteerBank:
        """A bank of the steers `keep` (copied from this one, as stored) and `added` (packed from
        their files), on `device` in `dtype` (default: this bank's)."""
        device, dtype = torch.device(device or self.device), dtype or self.dtype
        fresh = SteerBank.pack(added, "cpu", dense=self.dense) if added else None
        parts = [(self, n) for n in keep] + [(fresh, n) for n in added]
        blocks = [bank.weights(n) for bank, n in parts]
        ranks = [bank.entries[bank.index[n]].rank for bank, n in parts]
        headers = {n: bank.headers[n] for bank, n in parts}
        bags = self.bags if device.type == self.device.type else None
        return SteerBank(headers, blocks, ranks, device, dtype, self.dense, bags)

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One steer's down block [D, K*r] and up block [K*r, D] (None if dense): views."""
        e = self.entries[self.index[name]]
        width = e.num_dims * e.rank
        if self.bags:
            down = self.down[e.down_start:e.down_start + self.hidden_size * width].view(self.hidden_size, width)
        else:
            down = self.down[:, e.down_start:e.down_start + width]
        up = None if e.up_start < 0 else self.up[e.up_start:e.up_start + e.num_dims * e.rank]
        return down, up

    def nbytes(self, name: str) -> int:
        """What one steer costs in this bank: the bytes of its weights here."""
        return sum(t.numel() * t.element_size() for t in self.weights(name) if t is not None)

    @property
    def total_rank(self) -> int:
        return sum(e.num_dims * e.rank for e in self.entries)

    def row_entries(self, request: dict[str, list[float]]) -> tuple[list[int], list[list[float]]]:
        """A request's steers as (bank indices, each one's K values with its eps folded in); a steer
        whose values are all zero is left out (it changes nothing)."""
        indices, values = [], []
        for name, vals in request.items():
            if any(vals):
                indices.append(self.index[name])
                values.append([self.headers[name].epsilon * v for v in vals])
        return indices, values

    def warm_up(self, max_rows: int, max_steers: int, hidden_dtype: torch.dtype) -> int:
        """Compile every kernel variant `steer` can launch for 1..max_rows rows of this dtype (on
        CUDA; nothing to compile elsewhere). Returns how many variants ran."""
        return warm_up(self.down, self.up, self.cols, self.max_dims, max_rows, max_steers, hidden_dtype, self.layout)

    def steer(self, hidden: torch.Tensor, row_steer: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
        """Every row of `hidden` [B, D] steered by the steers it names: row_steer [B, S] (bank
        indices, -1 none) with row_values [B, S, max_dims] (eps folded in). The bank on its device."""
        return steer_hidden_gather(hidden, self.down, self.up, self.cols, row_steer, row_values, self.layout)


def _stored_block(down: torch.Tensor, up: torch.Tensor, k: int, r: int,
                  dense: bool) -> tuple[tuple[torch.Tensor, torch.Tensor | None], int]:
    """A factored steer's (down [D, K*r], up [K*r, D]) as a bank stores it: dense ([D, K*D] of W_k,
    computed in float64) if allowed and its rank is above D/2 (fewer multiply-adds: D*K per row
    against 2*D*K*r), else as given. With its stored rank."""
    d = down.shape[0]
    if not dense or 2 * r <= d:
        return (down, up), r
    w = dim_matrices(down.double().view(d, k, r).permute(1, 0, 2), up.double().view(k, r, d).transpose(1, 2),
                     torch.float64)
    return (w.permute(1, 0, 2).reshape(d, k * d).float(), None), d
