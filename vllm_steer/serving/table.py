"""The per-request table: each request's steer values (eps folded in) at the index the model
runner gives it, on the host and on the device, over the low-rank bank of the loaded steers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import check_fits_model
from vllm_steer.steer.formula import SteerBank
from vllm_steer.steer.values import SteerRequestError, parse_steer_args

from .config import SteerConfig

if TYPE_CHECKING:
    from vllm import SamplingParams

logger = init_logger("vllm.vllm_steer")  # under vLLM's logger: its handler, level and format


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
        """A table over every steer of `config`, loaded from its file and checked to fit a model of
        this hidden size; packed on the host, dense where the torch op runs (off CUDA)."""
        files = load_fitting_steers(config, list(config.steers), hidden_size)
        return cls(config, SteerBank.pack(files, "cpu", dense=torch.device(device).type != "cuda"), capacity, device)

    @property
    def capacity(self) -> int:
        """The most rows (MRV1) or slots (MRV2) a step can have."""
        return self.host_steers.shape[0] - 1

    def in_use(self, name: str) -> bool:
        return bool((self.host_steers == self.bank.index[name]).any())

    def reconfigured(self, served: SteerConfig, new_files: dict[str, SteerFile]) -> SteerTable:
        """A table serving `served`: `new_files` added, unloaded steers retired (kept while
        recently unloaded or still in use), every row's steers carried over."""
        now = time.monotonic()
        retired = {n: self.retired.get(n, now) for n in self.bank.names if n not in served.steers}
        retired = {n: t for n, t in retired.items() if now - t < self.RETIRE_GRACE_S or self.in_use(n)}
        kept = [n for n in self.bank.names if n in served.steers or n in retired]
        bank = self.bank.repacked(kept, new_files)
        steers = {n: self.config.steers.get(n) or served.steers[n] for n in bank.names}
        bounds = {n: served.value_bounds.get(n) or self.config.value_bounds[n] for n in bank.names}
        config = SteerConfig(steers, served.max_abs_value, bounds, served.max_steers_per_request,
                             served.memory_budget)
        table = SteerTable(config, bank, self.capacity, self.device_type)
        table.retired = retired
        # Old bank index -> new (every steer a row holds is kept); -1 stays -1 (the extra entry).
        new_index = torch.tensor([bank.index.get(n, -1) for n in self.bank.names] + [-1], dtype=torch.int32)
        slots = min(self.host_steers.shape[1], table.host_steers.shape[1])
        table.host_steers[:, :slots] = new_index[self.host_steers[:, :slots].long()]
        dims = min(self.bank.max_dims, bank.max_dims)
        table.host_values[:, :slots, :dims] = self.host_values[:, :slots, :dims]
        table.steered[:] = self.steered
        table.flush()
        return table

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


def load_fitting_steers(config: SteerConfig, names: list[str], hidden_size: int) -> dict[str, SteerFile]:
    """The named steers of `config`, loaded, each checked to fit a model of this hidden size."""
    for name in names:
        check_fits_model(config.catalog[name], hidden_size, f"steer {name!r} ({config.steers[name]})")
    return {name: SteerFile.load(config.steers[name]) for name in names}
