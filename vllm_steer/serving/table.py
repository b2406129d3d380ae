"""The per-request table: each request's steer values (eps folded in) at the index the model
runner gives it, on the host and on the device, over the low-rank bank of the loaded steers."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from vllm_steer.log import logger
from vllm_steer.steer.bank import BankStorage, SteerBank
from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import check_fits_model
from vllm_steer.steer.values import SteerRequestError, parse_steer_args

from .config import SteerConfig

if TYPE_CHECKING:
    from vllm import SamplingParams


class SteerTable:
    """Each request's steers, by row (MRV1) or slot (MRV2): for up to S steers per request, the
    steer's bank index (-1: none) and its K values with eps folded in. A host table written as
    requests arrive, and a device copy the step reads. The extra last row stays empty, so an
    index of -1 (MRV2's padding) reads as unsteered. Its size does not depend on how many steers
    are loaded."""

    # An unloaded steer stays usable this long for requests admitted just before the unload
    # that the scheduler has not placed yet, and after that while any row still holds it.
    RETIRE_GRACE_S = 120.0

    def __init__(self, config: SteerConfig, bank: SteerBank, capacity: int, device: torch.device) -> None:
        self.config, self.bank, self.device_type = config, bank, torch.device(device)
        self.bounds = config.bounds_for(bank.headers)
        self.retired: dict[str, float] = {}  # unloaded steers still served: name -> time of unload
        self.file_sha256: dict[str, str] = {}  # the steers read from files at start-up: name -> SHA-256
        slots = config.max_steers_per_request
        # Pageable, not pinned: a copy from pageable memory has read the source before it
        # returns, so the host may rewrite this table while the GPU is still behind.
        self.host_steers = torch.full((capacity + 1, slots), -1, dtype=torch.int32)
        self.host_values = torch.zeros(capacity + 1, slots, bank.max_dims, dtype=torch.float32)
        on_host = self.device_type.type == "cpu"
        self.steers = self.host_steers if on_host else self.host_steers.to(device)
        self.values = self.host_values if on_host else self.host_values.to(device)
        self.steered = np.zeros(capacity + 1, dtype=bool)

    @classmethod
    def load(cls, config: SteerConfig, capacity: int, device: torch.device, hidden_size: int) -> SteerTable:
        """A table over every steer of `config`, read from its file (on this node) and checked to fit a
        model of this hidden size; packed on the host in the storage the op on `device` reads (placed on the
        device once the model is loaded). `file_sha256` records what was read, to compare with the steer set
        the front end started with."""
        loaded = config.read_files()
        files = {name: steer for name, (steer, _) in loaded.items()}
        for name, steer in files.items():
            check_fits_model(steer.header, hidden_size, f"steer {name!r} ({config.steers[name]})")
        table = cls(config, SteerBank.pack(files, BankStorage.for_device(device)), capacity, device)
        table.file_sha256 = {name: sha for name, (_, sha) in loaded.items()}
        return table

    @property
    def capacity(self) -> int:
        """The most rows (MRV1) or slots (MRV2) a step can have."""
        return self.host_steers.shape[0] - 1

    def in_use(self, name: str) -> bool:
        return bool((self.host_steers == self.bank.index[name]).any())

    def with_steers(self, served: SteerConfig, new_files: dict[str, SteerFile]) -> SteerTable:
        """A new table, without rows yet, serving `served`: `new_files` added, unloaded steers retired
        (kept while recently unloaded or still in use). Nothing here reads a path: the weights and
        headers come from this table's bank and `new_files`, which may have arrived as bytes."""
        # A steer loaded under the name of one still here (retired: the front end admits no request
        # for it) replaces it, unless requests admitted before its unload still hold it: they
        # would change steer mid-generation.
        held = [n for n in new_files if n in self.bank.index and self.in_use(n)]
        if held:
            raise ValueError(f"steer {held[0]!r} was unloaded and requests admitted before that still use it; load it "
                             "again under this name once they finish, or under another name now")
        now = time.monotonic()
        retired = {n: self.retired.get(n, now) for n in self.bank.names if n not in served.steers}
        retired = {n: t for n, t in retired.items() if now - t < self.RETIRE_GRACE_S or self.in_use(n)}
        kept = [n for n in self.bank.names if (n in served.steers or n in retired) and n not in new_files]
        bank = self.bank.repacked(kept, new_files)
        steers = {n: self.config.steers.get(n) or served.steers[n] for n in bank.names}
        # The operator's bounds only: bounds_for() adds each steer's own from the headers loaded here.
        bounds = {n: b for n, b in {**self.config.bounds, **served.bounds}.items() if n in bank.names}
        config = replace(served, steers=steers, bounds=bounds)
        table = SteerTable(config, bank, self.capacity, self.device_type)
        table.retired = retired
        return table

    def carry_rows_from(self, old: SteerTable) -> None:
        """Take over every row of `old` (the requests in flight keep their values): each steer a row
        holds maps to its index in this bank. A row holding a steer this bank lacks (the front end
        and the workers disagree) is served unsteered and logged, never raised on."""
        new_index = torch.tensor([self.bank.index.get(n, -1) for n in old.bank.names] + [-1], dtype=torch.int32)
        slots = min(old.host_steers.shape[1], self.host_steers.shape[1])
        held = old.host_steers[:, :slots].long()
        mapped = new_index[held]
        lost = (held >= 0) & (mapped < 0)
        if bool(lost.any()):
            rows = lost.any(dim=1).nonzero().flatten().tolist()
            logger.error("vllm-steer: rows %s hold steers this worker no longer serves; they are served UNSTEERED "
                         "from now on", rows)
        self.host_steers[:, :slots] = mapped
        dims = min(old.bank.max_dims, self.bank.max_dims)
        self.host_values[:, :slots, :dims] = old.host_values[:, :slots, :dims]
        self.host_values[:, :slots][lost] = 0.0
        self.steered[:] = (self.host_steers >= 0).any(dim=1).numpy()
        self.flush()

    def set(self, index: int, params: SamplingParams) -> None:
        # Validated in the front end already; parsed again here against this table's steers. A
        # failure here means the front end and the workers disagree on the steer set: never worth
        # the engine (it would fail every request in flight), so the row is served unsteered, loudly.
        try:
            request = parse_steer_args(params.extra_args, self.bank.headers, self.bounds,
                                       self.config.max_steers_per_request)
        except SteerRequestError as e:
            logger.error("vllm-steer: a request admitted by the API front end names steers this worker does not "
                         "serve (%s); it is served UNSTEERED. The front end's and the workers' steer sets differ.", e)
            request = {}
        steers, values = self.bank.row_entries(request)
        self.clear(index)
        for slot, (n, vals) in enumerate(zip(steers, values, strict=True)):
            self.host_steers[index, slot] = n
            self.host_values[index, slot, :len(vals)] = torch.tensor(vals, dtype=torch.float32)
        self.steered[index] = bool(steers)

    def clear(self, index: int) -> None:
        self.host_steers[index] = -1
        self.host_values[index] = 0.0
        self.steered[index] = False

    def move(self, src: int, dst: int) -> None:
        self.host_steers[dst] = self.host_steers[src]
        self.host_values[dst] = self.host_values[src]
        self.steered[dst] = self.steered[src]
        self.clear(src)

    def swap(self, a: int, b: int) -> None:
        for table in (self.host_steers, self.host_values):
            table[[a, b]] = table[[b, a]]
        self.steered[[a, b]] = self.steered[[b, a]]

    def flush(self, rows: int | None = None) -> None:
        if self.steers is not self.host_steers:
            self.steers[:rows].copy_(self.host_steers[:rows], non_blocking=True)
            self.values[:rows].copy_(self.host_values[:rows], non_blocking=True)

    def rows(self, count: int, row_to_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's per-row steers and values on the device: rows 0..count-1 (MRV1), or the
        table entries `row_to_index` names (MRV2)."""
        if row_to_index is None:
            return self.steers[:count], self.values[:count]
        return self.steers[row_to_index], self.values[row_to_index]
