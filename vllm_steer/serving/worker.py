"""The steering of one worker process: the table of its requests' steers (kept by the state processor),
the model it steers (attached once the model is loaded; each steered logits layer is handed this object),
which logits computation is the step's sampling one, and the worker half of the runtime registry.

vLLM builds the processor, the model's layers and the worker's RPC methods separately and gives them no
channel to each other, so the process holds one WorkerSteering (`worker_steering()`), and its state
changes only through the methods below."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vllm_steer.log import logger
from vllm_steer.steer.bank import SteerBank
from vllm_steer.steer.file import SteerFile, SteerFileError, SteerHeader
from vllm_steer.steer.fingerprint import FINGERPRINT_MISMATCH, check_fits_model, fingerprint_mismatch

from .config import SteerConfig
from .table import SteerTable

# The worker methods collective_rpc names for the runtime registry (installed on vLLM's WorkerBase).
RPC_PREFIX = "vllm_steer_"
RPC_METHODS = ("prepare", "commit", "discard", "keywords")
# A runtime load's refusal in a worker names the check that failed in this tag: the front end tells the client
# that and nothing else of the message (which may quote the file).
REFUSAL_TAG = "[vllm-steer check: {}]"


@dataclass(frozen=True)
class SamplingRows:
    """The logits rows of one step's sampling call: how many; whether any names a steer; and under Model
    Runner V2 each row's table slot (the legacy runner's row i is table row i)."""

    rows: int
    steered: bool
    row_to_index: torch.Tensor | None = None


class WorkerSteering:
    """What one worker process steers with (see the module docstring)."""

    def __init__(self) -> None:
        self.table: SteerTable | None = None
        self.idle_stage: str | None = None  # a pipeline stage that computes no logits: it steers nothing
        self.vocab_size = 0
        self.max_rows = 0  # the most logits rows a step can have (requests x (1 + speculative tokens))
        self.lm_head: torch.nn.Module | None = None  # kept to check steers loaded at run time
        self.placement: tuple[torch.device, torch.dtype] | None = None  # the steer weights' device and dtype
        self.hidden_dtype: torch.dtype | None = None  # the model's hidden state dtype (the kernels compile for it)
        self._armed: SamplingRows | None = None  # the legacy runner's next sampling call, from update_state
        self._in_window = False  # the runner is computing the step's sampling logits
        self._window_step: SamplingRows | None = None  # Model Runner V2: the rows its sample() hands over
        self._sampling_calls = 0
        self._prepared: tuple[str, SteerTable] | None = None  # a runtime change, prepared, not yet served

    # -- set-up: the state processor, then the model
    def serve(self, table: SteerTable, vocab_size: int, max_rows: int) -> None:
        """Serve `table` (built by the state processor at start-up)."""
        self.table, self.vocab_size, self.max_rows, self.idle_stage = table, vocab_size, max_rows, None

    def stand_idle(self, stage: str) -> None:
        """This worker is a pipeline stage that computes no logits: it loads and steers nothing."""
        self.table, self.idle_stage = None, stage

    def attach(self, layers: list[torch.nn.Module], lm_head: torch.nn.Module | None, device: torch.device,
               dtype: torch.dtype) -> None:
        """Once, right after the model is loaded (before vLLM sizes the KV cache): hand the model's steered
        logits `layers` this object; each steer must fit the model's output embedding (`lm_head`), or the
        server does not start; then the steers go to the model's device (counted in vLLM's memory accounting)
        and the kernels they need are compiled, so that nothing compiles while serving. `device`, `dtype`: the
        model's."""
        for layer in layers:
            layer.steering = self
        self.lm_head = getattr(lm_head, "base_layer", lm_head)  # under LoRA, the wrapped head
        self.check_fingerprints(self.table.bank.headers, self.table.config.steers)
        # fp32 weights (exact, and what the CPU torch op computes in anyway), except on a GPU serving a
        # half-precision model, where the kernel reads the weights in the model's dtype: half the bytes, and
        # within the rounding the model's own hidden state has.
        half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        self.placement, self.hidden_dtype = (device, dtype if half else torch.float32), dtype
        self._place(self.table)

    # -- per step
    def arm(self, step: SamplingRows) -> None:
        """The legacy runner's state processor, in update_state: the step's sampling call has these rows."""
        self._armed = step

    @contextmanager
    def sampling(self, step: SamplingRows | None = None) -> Iterator[None]:
        """The model runner computes this step's sampling logits inside (the legacy runner's execute_model,
        Model Runner V2's sample): the steered layer's call in here is that computation and is steered; every
        other call (the profile run, prompt logprobs, a draft model) passes through. `step`: the rows (Model
        Runner V2); None: those the state processor arms inside the window, before the logits (the legacy
        runner updates its batch in execute_model)."""
        self._in_window, self._window_step, self._sampling_calls = True, step, 0
        try:
            yield
        finally:
            self._in_window, self._window_step = False, None

    def steer_sampling_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The steered layer's call: inside `sampling`, the step's rows steered by their own steers."""
        if not self._in_window or self.table is None:
            return hidden
        step = self._window_step or self._armed
        self._sampling_calls += 1
        if step is None or not step.steered:
            return hidden
        # The sampling logits are computed from exactly the step's logits rows (one per request in the legacy
        # runner's persistent batch, logits_indices under Model Runner V2), in one call. Anything else means
        # vLLM computes them differently from what this plugin was checked against: steered rows would be
        # served unsteered or with another row's steer, so refuse loudly.
        if hidden.shape[0] != step.rows or self._sampling_calls > 1:
            raise RuntimeError(
                f"vllm-steer: the step's sampling logits were computed from {hidden.shape[0]} rows in call "
                f"{self._sampling_calls}, where {step.rows} rows in one call were expected; refusing to serve steered "
                "requests with other rows' steers. This vLLM computes logits differently from the versions "
                "vllm-steer was checked against.")
        steers, values = self.table.rows(step.rows, step.row_to_index)
        return self.table.bank.steer(hidden, steers, values)

    # -- the runtime registry's worker half, run in every worker through collective_rpc
    def prepare(self, token: str, config_json: str, added: str | None = None, data: bytes | None = None) -> dict:
        """Phase one: build (but do not serve) the table for the steer set `config_json`, with the steer
        `added` parsed from its file's `data`. Raises, changing nothing, if the steer does not fit the model
        (hidden size, fingerprint: refused by every tensor-parallel rank together) or the set would exceed
        the memory budget."""
        if self.table is None:
            if self.idle_stage is not None:
                return {"stage": self.idle_stage}
            raise RuntimeError("vllm-steer is not active in this worker (no SteerLogitsProcessor)")
        try:
            return self._prepare(token, config_json, added, data)
        except SteerFileError as e:
            raise SteerFileError(f"{e} {REFUSAL_TAG.format(e.check)}", e.check) from e
        except ValueError as e:
            raise ValueError(f"{e} {REFUSAL_TAG.format(e)}") from e

    def _prepare(self, token: str, config_json: str, added: str | None, data: bytes | None) -> dict:
        served = SteerConfig.from_json(config_json)
        files: dict[str, SteerFile] = {}
        if added is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"steer {added!r}: expected the file's bytes, got {type(data).__name__}")
            where = f"steer {added!r} ({served.steers.get(added, 'sent by the front end')}, received on node " \
                    f"{socket.gethostname()})"
            steer = SteerFile.from_bytes(data, where=where)
            check_fits_model(steer.header, self.table.bank.hidden_size, where)
            files[added] = steer
        self.check_fingerprints({n: f.header for n, f in files.items()}, served.steers)
        table = self.table.with_steers(served, files)
        self._place(table)  # the memory budget is checked where the steers are served
        self._prepared = (token, table)
        return {"prepared": token, "steers": list(table.bank.names)}

    def commit(self, token: str) -> dict:
        """Phase two: serve the prepared table from the next step on, carrying over every request in flight
        (rows may have changed since phase one)."""
        if self.table is None and self.idle_stage is not None:
            return {"stage": self.idle_stage}
        if self._prepared is None or self._prepared[0] != token:
            raise RuntimeError(f"vllm-steer: no steer set prepared under {token} in this worker")
        table = self._prepared[1]
        table.carry_rows_from(self.table)
        self.table, self._prepared = table, None
        return {"steers": list(table.bank.names), "retired": list(table.retired)}

    def discard(self, token: str) -> None:
        """Drop a prepared table (another worker refused it). Idempotent."""
        if self._prepared is not None and self._prepared[0] == token:
            self._prepared = None

    def keywords(self, name: str, candidates: int) -> dict:
        """The tokens of this rank's vocabulary shard whose output embedding projects most and least on the primary
        direction of steer `name` (`SteerBank.primary_direction`), `candidates` of each as (token id, projection),
        and the shard's rows summed, projected on u (the front end fixes the direction's sign with the mean
        embedding row over every shard, so that "promoted" means what +1 raises)."""
        if self.table is None:
            return {"stage": self.idle_stage}
        if name not in self.table.bank.index:
            raise KeyError(f"no steer named {name!r} is loaded in this worker")
        weight = getattr(self.lm_head, "weight", None)
        shard = getattr(self.lm_head, "shard_indices", None)
        if weight is None or shard is None:
            raise RuntimeError("vllm-steer: the LM head is not a plain [V, D] weight: no keywords")
        u, _, v = self.table.bank.primary_direction(name)
        rows = weight[: shard.num_org_elements]
        proj = (rows.float() @ v.to(rows.device, torch.float32)).cpu()
        top, bottom = proj.topk(min(candidates, len(proj))), (-proj).topk(min(candidates, len(proj)))
        first = shard.org_vocab_start_index
        return {"top": [(first + int(i), float(s)) for s, i in zip(top.values, top.indices, strict=True)],
                "bottom": [(first + int(i), -float(s)) for s, i in zip(bottom.values, bottom.indices, strict=True)],
                "context": float(rows.float().sum(0).cpu().double() @ u)}

    # -- checks
    def check_fingerprints(self, headers: dict[str, SteerHeader], sources: dict[str, str]) -> None:
        """Each steer's fingerprint against this rank's shard of the LM head, the refusal agreed by every
        tensor-parallel rank. `sources`: where each steer came from, for the error message."""
        weight = getattr(self.lm_head, "weight", None)
        shard = getattr(self.lm_head, "shard_indices", None)
        hidden_size = self.table.bank.hidden_size
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden_size or shard is None:
            logger.warning("vllm-steer: the LM head is not a plain [V, D] weight; embedding fingerprints not checked")
            return
        names = [n for n, h in headers.items() if h.fingerprint]
        problems = [fingerprint_mismatch(headers[n].fingerprint, weight[: shard.num_org_elements],
                                         first_row=shard.org_vocab_start_index, vocab_size=self.vocab_size)
                    for n in names]
        refused = _refused_by_any_tp_rank([p is not None for p in problems], weight.device)
        for name, problem, refuse in zip(names, problems, refused, strict=True):
            if refuse:
                base_model = headers[name].base_model
                raise SteerFileError(
                    f"steer {name!r} ({sources.get(name, 'received')}) does not fit this model's output embedding: "
                    + (problem or "another tensor-parallel rank found a mismatch in its vocabulary shard")
                    + (f"; it was made for {base_model}" if base_model else ""), FINGERPRINT_MISMATCH)

    def _place(self, table: SteerTable) -> None:
        """Put a table's steers where the model is and compile their kernels there (at start-up, and for the
        table a runtime change prepares). Refuses steers over the memory budget."""
        if self.placement is None:  # the model is not loaded yet: attach places it
            return
        device, dtype = self.placement
        bank = table.bank.placed(device, dtype)
        _check_memory_budget(bank, table.config.memory_budget)
        table.bank = bank
        compiled = bank.warm_up(self.max_rows or table.capacity, table.config.max_steers_per_request, self.hidden_dtype)
        dense = sum(e.up_start < 0 for e in bank.entries)
        logger.info("vllm-steer: %d steers on %s in %s: %.1f MiB%s%s", len(bank.names), device, dtype,
                    bank.nbytes() / 2**20, f" ({dense} dense W_k, one GEMM each)" if dense else "",
                    f"; {compiled} kernel variants compiled" if compiled else "")


_STEERING = WorkerSteering()


def worker_steering() -> WorkerSteering:
    """This process's WorkerSteering."""
    return _STEERING


def _check_memory_budget(bank: SteerBank, budget: int | None) -> None:
    """Refuse a steer set that would take more than the operator's budget where it is served."""
    if budget is not None and bank.nbytes() > budget:
        largest = sorted(bank.names, key=bank.nbytes, reverse=True)[:3]
        raise SteerFileError(
            f"the {len(bank.names)} steers would take {bank.nbytes() / 2**20:.1f} MiB on {bank.device} in "
            f"{bank.dtype}, over the steer memory budget of {budget / 2**20:.1f} MiB (--steer-memory-budget); "
            "the largest: " + ", ".join(f"{n} ({bank.nbytes(n) / 2**20:.1f} MiB)" for n in largest)
            + ". Load fewer steers, lower their rank, or raise the budget.",
            "the steers would be over the steer memory budget (--steer-memory-budget)")


def _refused_by_any_tp_rank(refused_here: list[bool], device: torch.device) -> list[bool]:
    """Under tensor parallelism each rank checks only its own vocabulary shard. The ranks must refuse
    together: a rank that passed would otherwise wait forever in the logits gather (or serve a steer set
    its peers refused)."""
    from vllm.distributed import parallel_state

    if not refused_here or not parallel_state.model_parallel_is_initialized():
        return refused_here
    group = parallel_state.get_tp_group()
    if group.world_size == 1:
        return refused_here
    votes = group.all_reduce(torch.tensor(refused_here, dtype=torch.float32, device=device))
    return (votes > 0).tolist()
