"""The steer bank: many steers' weights packed for per-row gathering, in the one storage the op of the
device that serves them reads (chosen once, by `BankStorage.for_device`). Pure torch, no vLLM.

A step costs what the steers its rows name cost, however many are loaded: each row names a few bank
indices with their values, and the per-row gather op (`vllm_steer.kernels`) reads only those steers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_steer.kernels import GatherLayout, steer_hidden_gather, warm_up

from .file import SteerFile, SteerHeader
from .formula import dim_matrices


@dataclass(frozen=True)
class BankStorage:
    """How a bank stores its steers' weights, for the op that reads them.

    flat: each steer's down block [D, K*r] contiguous in a flat buffer, at an element offset that is a
    multiple of its width (so every block is whole rows of a [-1, K*r] view): the CPU torch op's
    embedding bags. Otherwise one row-major [D, C] matrix with every steer's P1_k side by side: the CUDA
    kernel's. dense: a steer whose rank per dim is above D/2 is stored as its W_k = P1_k P2_k^T ([D, K*D],
    fewer multiply-adds; the torch op only)."""

    flat: bool
    dense: bool

    @classmethod
    def for_device(cls, device: torch.device | str) -> BankStorage:
        """The storage the op on `device` reads: the kernel's on CUDA, the torch op's elsewhere."""
        return KERNEL_STORAGE if torch.device(device).type == "cuda" else CPU_STORAGE


KERNEL_STORAGE = BankStorage(flat=False, dense=False)
CPU_STORAGE = BankStorage(flat=True, dense=True)


@dataclass(frozen=True)
class BankEntry:
    """Where one steer's weights sit in a bank: `num_dims` dims of rank `rank` from `down_start` of `down`
    (a column, or an element offset in flat storage), and from row `up_start` of `up` (-1: dense, W_k in
    `down`, rank D)."""

    down_start: int
    num_dims: int
    rank: int
    up_start: int

    @property
    def width(self) -> int:
        return self.num_dims * self.rank


class SteerBank:
    """Loaded steers packed for per-row gathering.

    `down` holds each steer's P1_k side by side (K*r columns), or its W_k if stored dense; `up` [U, D] the
    factored steers' P2_k^T stacked; `cols` [N, 4] (down_start, K, r, up_start per steer, in `names` order)
    says where; `layout` the host-side facts of `cols` the CUDA kernel's launch needs. A row's request is
    (steer index, K values with eps folded in) per steer it names: see `row_entries`."""

    def __init__(self, headers: dict[str, SteerHeader], entries: list[BankEntry], down: torch.Tensor,
                 up: torch.Tensor, storage: BankStorage) -> None:
        """From packed tensors: use `pack` (from steer files) or `repacked` (from another bank)."""
        self.headers, self.entries, self.down, self.up, self.storage = dict(headers), entries, down, up, storage
        self.names = list(headers)
        self.index = {name: n for n, name in enumerate(self.names)}
        self.hidden_size = up.shape[1]
        self.max_dims = max(h.num_dims for h in headers.values())
        self.cols = torch.tensor([[e.down_start, e.num_dims, e.rank, e.up_start] for e in entries],
                                 dtype=torch.int64 if storage.flat else torch.int32, device=down.device)
        self.layout = GatherLayout.of((e.down_start, e.num_dims, e.rank, e.up_start) for e in entries)

    @classmethod
    def pack(cls, steers: dict[str, SteerFile], storage: BankStorage) -> SteerBank:
        """The steers packed in `storage`, in float32 on the CPU (`placed` moves them to the device)."""
        blocks = []
        for steer in steers.values():
            k, d, r = steer.projector1.shape
            down = steer.projector1.float().permute(1, 0, 2).reshape(d, k * r)
            up = steer.projector2.float().permute(0, 2, 1).reshape(k * r, d)
            blocks.append(_stored_block(down, up, k, r, storage.dense))
        return cls._assembled({n: s.header for n, s in steers.items()}, blocks, storage)

    @classmethod
    def _assembled(cls, headers: dict[str, SteerHeader],
                   blocks: list[tuple[torch.Tensor, torch.Tensor | None, int]], storage: BankStorage) -> SteerBank:
        """From each steer's (down block [D, K*r], up block [K*r, D] or None if dense, stored rank)."""
        if not headers:
            raise ValueError("a SteerBank needs at least one steer")
        sizes = {h.hidden_size for h in headers.values()}
        if len(sizes) != 1:
            raise ValueError(f"all steers must share one hidden size, got {sorted(sizes)}")
        hidden_size = sizes.pop()
        entries, down_start, up_start = [], 0, 0
        for header, (down, up, rank) in zip(headers.values(), blocks, strict=True):
            width = down.shape[1]
            if storage.flat:  # the block's offset a multiple of its width: whole rows of a [-1, width] view
                down_start = -(-down_start // width) * width
            entries.append(BankEntry(down_start, header.num_dims, rank, -1 if up is None else up_start))
            down_start += down.numel() if storage.flat else width
            up_start += 0 if up is None else up.shape[0]
        dtype, device = blocks[0][0].dtype, blocks[0][0].device
        if storage.flat:
            packed = torch.zeros(down_start, dtype=dtype, device=device)
            for e, (down, _, _) in zip(entries, blocks, strict=True):
                packed[e.down_start:e.down_start + down.numel()].view_as(down).copy_(down)
        else:
            packed = torch.cat([down for down, _, _ in blocks], dim=1).contiguous()
        ups = [up for _, up, _ in blocks if up is not None]
        stacked = torch.cat(ups) if ups else packed.new_zeros(0, hidden_size)
        return cls(headers, entries, packed, stacked, storage)

    @property
    def device(self) -> torch.device:
        return self.down.device

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    def placed(self, device: torch.device | str, dtype: torch.dtype) -> SteerBank:
        """This bank on `device` in `dtype`, in the same storage (which must be the one that device's op
        reads)."""
        device = torch.device(device)
        if device.type == "cuda" and self.storage != KERNEL_STORAGE:
            raise ValueError(f"a bank stored for the CPU op ({self.storage}) cannot be served on {device}: pack it "
                             "with BankStorage.for_device")
        if (device, dtype) == (self.device, self.dtype):
            return self
        return SteerBank(self.headers, self.entries, self.down.to(device, dtype), self.up.to(device, dtype),
                         self.storage)

    def repacked(self, keep: list[str], added: dict[str, SteerFile]) -> SteerBank:
        """A bank of the steers `keep` (copied from this one, as stored) and `added` (packed from their files),
        in this bank's storage, on its device, in its dtype."""
        fresh = SteerBank.pack(added, self.storage).placed(self.device, self.dtype) if added else None
        parts = [(self, n) for n in keep] + [(fresh, n) for n in added]
        blocks = [(*bank.weights(n), bank.entries[bank.index[n]].rank) for bank, n in parts]
        return SteerBank._assembled({n: bank.headers[n] for bank, n in parts}, blocks, self.storage)

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One steer's down block [D, K*r] and up block [K*r, D] (None if dense): views."""
        e = self.entries[self.index[name]]
        if self.storage.flat:
            down = self.down[e.down_start:e.down_start + self.hidden_size * e.width].view(self.hidden_size, e.width)
        else:
            down = self.down[:, e.down_start:e.down_start + e.width]
        up = None if e.up_start < 0 else self.up[e.up_start:e.up_start + e.width]
        return down, up

    def nbytes(self, name: str | None = None) -> int:
        """What one steer (None: the whole bank) takes here: the bytes of its weights."""
        if name is None:
            return sum(t.numel() * t.element_size() for t in (self.down, self.up))
        return sum(t.numel() * t.element_size() for t in self.weights(name) if t is not None)

    def primary_direction(self, name: str) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(u, sigma, v) of the primary dim's W = P1 P2^T's top singular triplet, in float64 on the CPU: steering
        +1 on the dim moves token x's logit by about eps * sigma (h . u)(v . e_x). From the factors by two QRs
        (an SVD of r x r), or from W itself where the bank stores it dense."""
        header = self.headers[name]
        k = header.primary_index
        e = self.entries[self.index[name]]
        down, up = (t.double().cpu() if t is not None else None for t in self.weights(name))
        block = down[:, k * e.rank:(k + 1) * e.rank]
        if up is None:  # dense: the block is W_k itself
            u, s, vh = torch.linalg.svd(block)
            return u[:, 0], float(s[0]), vh[0]
        q1, r1 = torch.linalg.qr(block)  # P1_k = Q1 R1
        q2, r2 = torch.linalg.qr(up[k * e.rank:(k + 1) * e.rank].T)  # P2_k = Q2 R2
        u, s, vh = torch.linalg.svd(r1 @ r2.T)  # W = Q1 (R1 R2^T) Q2^T
        return q1 @ u[:, 0], float(s[0]), q2 @ vh[0]

    @property
    def total_rank(self) -> int:
        return sum(e.width for e in self.entries)

    def row_entries(self, request: dict[str, list[float]]) -> tuple[list[int], list[list[float]]]:
        """A request's steers as (bank indices, each one's K values with its eps folded in); a steer whose
        values are all zero is left out (it changes nothing)."""
        indices, values = [], []
        for name, vals in request.items():
            if any(vals):
                indices.append(self.index[name])
                values.append([self.headers[name].epsilon * v for v in vals])
        return indices, values

    def warm_up(self, max_rows: int, max_steers: int, hidden_dtype: torch.dtype) -> int:
        """Compile every kernel variant `steer` can launch for 1..max_rows rows of this dtype (on CUDA;
        nothing to compile elsewhere). Returns how many variants ran."""
        return warm_up(self.down, self.up, self.cols, self.max_dims, max_rows, max_steers, hidden_dtype, self.layout)

    def steer(self, hidden: torch.Tensor, row_steer: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
        """Every row of `hidden` [B, D] steered by the steers it names: row_steer [B, S] (bank indices, -1
        none) with row_values [B, S, max_dims] (eps folded in). The bank on its device."""
        return steer_hidden_gather(hidden, self.down, self.up, self.cols, row_steer, row_values, self.layout)


def _stored_block(down: torch.Tensor, up: torch.Tensor, k: int, r: int,
                  dense: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A factored steer's (down [D, K*r], up [K*r, D]) as a bank stores it, with its stored rank: dense
    ([D, K*D] of W_k, computed in float64) if allowed and its rank is above D/2 (fewer multiply-adds: D*K per
    row against 2*D*K*r), else as given."""
    d = down.shape[0]
    if not dense or 2 * r <= d:
        return down, up, r
    w = dim_matrices(down.double().view(d, k, r).permute(1, 0, 2), up.double().view(k, r, d).transpose(1, 2),
                     torch.float64)
    return w.permute(1, 0, 2).reshape(d, k * d).float(), None, d

