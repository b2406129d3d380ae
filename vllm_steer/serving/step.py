"""The step mailbox, one per worker process: what the state processor hands the steered logits layer
for the coming sampling call (the table, the armed row count, the row -> index map), and the
check that every steer fits the served model's output embedding, agreed by all TP ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_steer.steer.file import SteerFileError, SteerHeader
from vllm_steer.steer.fingerprint import fingerprint_mismatch
from vllm_steer.steer.formula import SteerBank

from .table import SteerTable, logger


@dataclass
class StepState:
    """What the state processor hands the logits layer for the coming sampling call."""

    table: SteerTable | None = None
    armed_rows: int = 0  # the next compute_logits with this many rows is the step's sampling call
    steered: bool = False  # any row of the armed step has nonzero values
    row_to_index: torch.Tensor | None = None  # MRV2: logits row -> slot; MRV1: None (row i is row i)
    vocab_size: int = 0
    lm_head: torch.nn.Module | None = None  # kept to check steers loaded at run time
    placement: tuple[torch.device, torch.dtype] | None = None  # the steer basis's device and dtype
    hidden_dtype: torch.dtype | None = None  # the model's hidden state dtype (what the kernels are compiled for)
    max_rows: int = 0  # the most logits rows a step can have (requests x (1 + speculative tokens))
    idle_stage: str | None = None  # set on a pipeline stage that computes no logits (it steers nothing)

    def arm(self, rows: int, steered: bool, row_to_index: torch.Tensor | None = None) -> None:
        self.armed_rows, self.steered, self.row_to_index = rows, steered, row_to_index

    def disarm(self) -> None:
        """Forget the armed step: every per-step field together."""
        self.armed_rows, self.steered, self.row_to_index = 0, False, None

    def attach_model(self, lm_head: torch.nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
        """Once, right after the model is loaded (before vLLM sizes the KV cache): each steer must
        fit this model's output embedding, or the server does not start; then the steer basis goes
        to the model's device (counted in vLLM's memory accounting) and the kernels it will launch
        are compiled, so that nothing compiles while serving. `dtype`: the model's (hidden state's)."""
        self.lm_head = getattr(lm_head, "base_layer", lm_head)  # under LoRA, the wrapped head
        self.check_fingerprints(self.table.bank.headers, self.table.config.steers)
        # fp32 weights (exact, and what the CPU torch op computes in anyway), except on a GPU
        # serving a half-precision model, where the kernel reads the weights in the model's
        # dtype: half the bytes, and within the rounding the model's own hidden state has.
        half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        self.placement, self.hidden_dtype = (device, dtype if half else torch.float32), dtype
        self.place(self.table)

    def place(self, table: SteerTable) -> None:
        """Put a table's steer basis where the model is, and compile its kernels there (at start-up,
        and for the table a runtime load or unload prepares). Refuses a basis over the budget."""
        if self.placement is None:  # the model is not loaded yet: attach_model places it
            return
        device, dtype = self.placement
        bank = table.bank.placed(device, dtype)
        check_memory_budget(bank, table.config.memory_budget)
        table.bank = bank
        compiled = bank.warm_up(self.max_rows or table.capacity, table.config.max_steers_per_request, self.hidden_dtype)
        dense = sum(e.up_start < 0 for e in bank.entries)
        logger.info("vllm-steer: %d steers on %s in %s: %.1f MiB%s%s", len(bank.names), device, dtype,
                    bank_bytes(bank) / 2**20, f" ({dense} dense W_k, one GEMM each)" if dense else "",
                    f"; {compiled} kernel variants compiled" if compiled else "")

    def check_fingerprints(self, headers: dict[str, SteerHeader], sources: dict[str, str]) -> None:
        """Each steer's fingerprint against this rank's shard of the LM head, the refusal agreed by
        every tensor-parallel rank. `sources`: where each steer came from, for the error message."""
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
        refused = refused_by_any_tp_rank([p is not None for p in problems], weight.device)
        for name, problem, refuse in zip(names, problems, refused, strict=True):
            if refuse:
                base_model = headers[name].base_model
                raise SteerFileError(
                    f"steer {name!r} ({sources.get(name, 'received')}) does not fit this model's output embedding: "
                    + (problem or "another tensor-parallel rank found a mismatch in its vocabulary shard")
                    + (f"; it was made for {base_model}" if base_model else "")
                )

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Steer the step's sampling rows; anything else (profiling, prompt logprobs, a
        draft model) passes through untouched."""
        if self.armed_rows != hidden_states.shape[0]:
            return hidden_states
        steered, row_to_index = self.steered, self.row_to_index
        self.disarm()
        if not steered:
            return hidden_states
        steers, values = self.table.rows(hidden_states.shape[0], row_to_index)
        return self.table.bank.steer(hidden_states, steers, values)


STEP = StepState()


def bank_bytes(bank: SteerBank) -> int:
    """What the loaded steers take where they are served."""
    return sum(t.numel() * t.element_size() for t in (bank.down, bank.up))


def check_memory_budget(bank: SteerBank, budget: int | None) -> None:
    """Refuse a steer set that would take more than the operator's budget where it is served."""
    if budget is not None and bank_bytes(bank) > budget:
        largest = sorted(bank.names, key=bank.nbytes, reverse=True)[:3]
        raise SteerFileError(
            f"the {len(bank.names)} steers would take {bank_bytes(bank) / 2**20:.1f} MiB on {bank.device} in "
            f"{bank.dtype}, over the steer memory budget of {budget / 2**20:.1f} MiB (--steer-memory-budget); "
            "the largest: " + ", ".join(f"{n} ({bank.nbytes(n) / 2**20:.1f} MiB)" for n in largest)
            + ". Load fewer steers, lower their rank, or raise the budget.")


def refused_by_any_tp_rank(refused_here: list[bool], device: torch.device) -> list[bool]:
    """Under tensor parallelism each rank checks only its own vocabulary shard. The ranks must
    refuse together: a rank that passed would otherwise wait forever in the logits gather (or
    serve a steer set its peers refused)."""
    from vllm.distributed import parallel_state

    if not refused_here or not parallel_state.model_parallel_is_initialized():
        return refused_here
    group = parallel_state.get_tp_group()
    if group.world_size == 1:
        return refused_here
    votes = group.all_reduce(torch.tensor(refused_here, dtype=torch.float32, device=device))
    return (votes > 0).tolist()
