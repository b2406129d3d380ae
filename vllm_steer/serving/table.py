"""The per-request table: each request's steer values (eps folded in) at the index the model
runner gives it, on the host and on the device, over the low-rank bank of the loaded steers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import check_fits_model
from vllm_steer.steer.formula import SteerBank
from vllm_steer.steer.values import parse_steer_args

from .config import SteerConfig

if TYPE_CHECKING:
    from vllm import SamplingParams


class SteerTable:
    """Each request's steer values, eps folded in, by row (MRV1) or slot (MRV2): a host
    table written as requests arrive and a device copy the step reads. The extra last row
    stays zero, so an index of -1 (MRV2's padding) reads as unsteered."""

    # An unloaded steer stays usable this long for requests admitted just before the unload
    # that the scheduler has not placed yet, and after that while any row still holds it.
    RETIRE_GRACE_S = 120.0

    def __init__(self, config: SteerConfig, files: dict[str, SteerFile], capacity: int,
                 device: torch.device) -> None:
        self.config, self.files, self.device_type = config, files, torch.device(device)
        self.bank = SteerBank(files)  # moved to the model's device and dtype at first use
        self.retired: dict[str, float] = {}  # unloaded steers still served: name -> time of unload
        # Pageable, not pinned: a copy from pageable memory has read the source before it
        # returns, so the host may rewrite this table while the GPU is still behind.
        self.host = torch.zeros(capacity + 1, self.bank.num_dims, dtype=torch.float32)
        self.device = self.host if device.type == "cpu" else torch.zeros_like(self.host, device=device)
        self.steered = np.zeros(capacity + 1, dtype=bool)

    @property
    def capacity(self) -> int:
        """The most rows (MRV1) or slots (MRV2) a step can have."""
        return self.host.shape[0] - 1

    def in_use(self, name: str) -> bool:
        start = self.bank.offsets[name]
        return bool(self.host[:, start:start + self.files[name].header.num_dims].any())

    def reconfigured(self, served: SteerConfig, new_files: dict[str, SteerFile]) -> SteerTable:
        """A table serving `served`: `new_files` added, unloaded steers retired (kept while
        recently unloaded or still in use), every row's values for kept steers carried over."""
        now = time.monotonic()
        retired = {n: self.retired.get(n, now) for n in self.files if n not in served.steers}
        retired = {n: t for n, t in retired.items() if now - t < self.RETIRE_GRACE_S or self.in_use(n)}
        kept = [n for n in self.files if n in served.steers or n in retired]
        files = {**{n: self.files[n] for n in kept}, **new_files}
        steers = {n: self.config.steers.get(n) or served.steers[n] for n in files}
        bounds = {n: served.value_bounds.get(n) or self.config.value_bounds[n] for n in files}
        config = SteerConfig(steers, served.max_abs_value, bounds)
        table = SteerTable(config, files, self.capacity, self.device_type)
        table.retired = retired
        for name in kept:
            old, new, k = self.bank.offsets[name], table.bank.offsets[name], files[name].header.num_dims
            table.host[:, new:new + k] = self.host[:, old:old + k]
        table.steered[:] = self.steered
        table.flush()
        return table

    def set(self, index: int, params: SamplingParams) -> None:
        # Validated in the front end already; parsed again here against this table's steers.
        request = parse_steer_args(params.extra_args, self.config.catalog, self.config.value_bounds)
        values = self.bank.row_values(request) if request else [0.0] * self.bank.num_dims
        self.host[index] = torch.tensor(values, dtype=torch.float32)
        self.steered[index] = any(values)

    def clear(self, index: int) -> None:
        self.host[index] = 0.0
        self.steered[index] = False

    def move(self, src: int, dst: int) -> None:
        self.host[dst] = self.host[src]
        self.steered[dst] = self.steered[src]
        self.clear(src)

    def swap(self, a: int, b: int) -> None:
        self.host[[a, b]] = self.host[[b, a]]
        self.steered[[a, b]] = self.steered[[b, a]]

    def flush(self, rows: int | None = None) -> None:
        if self.device is not self.host:
            self.device[:rows].copy_(self.host[:rows], non_blocking=True)


def load_fitting_steers(config: SteerConfig, names: list[str], hidden_size: int) -> dict[str, SteerFile]:
    """The named steers of `config`, loaded, each checked to fit a model of this hidden size."""
    for name in names:
        check_fits_model(config.catalog[name], hidden_size, f"steer {name!r} ({config.steers[name]})")
    return {name: SteerFile.load(config.steers[name]) for name in names}
