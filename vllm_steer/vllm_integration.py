"""Every contact with vLLM internals, in one place, checked at start-up.

Two pieces cooperate inside each vLLM worker process:
- `SteerLogitsProcessor`, the per-request state processor named with `--logits-processors`:
  it keeps a fixed-capacity table of each persistent-batch row's steer values, updated from
  vLLM's batch changes (added, removed, moved, swapped), and arms the step.
- `SteeredLogitsLayer`, registered out of tree in place of vLLM's `LogitsProcessor` layer:
  right before the LM head it steers the post-norm hidden state of every row in one batched
  op, then runs vLLM's own logits computation unchanged.
They meet in `_STEP`, one per process. The steer changes only h -> logits, so the KV cache,
prefix caching and the prompt's hidden states are untouched.

Only the legacy model runner (MRV1: the CPU backend, or GPU with VLLM_USE_V2_MODEL_RUNNER=0)
is supported; under Model Runner V2 start-up is refused rather than serving unsteered text.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import vllm
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from .kernels import steer_hidden
from .steer_bank import SteerBank
from .steer_config import ENV_VAR, SteerConfig
from .steer_file import SteerFileError, check_fits_model, fingerprint_mismatch
from .steer_request import STEER_KEY_PREFIX, SteerRequestError, parse_steer_args

logger = logging.getLogger("vllm_steer")

SUPPORTED_VLLM = ("0.32.",)
OOT_LAYER_NAME = "LogitsProcessor"


def check_vllm_internals() -> None:
    """Fail loudly at start-up if this vLLM is not the one whose internals we rely on."""
    version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"vllm-steer supports vLLM {', '.join(SUPPORTED_VLLM)}x; found {version}")
    params = list(inspect.signature(VllmLogitsLayer.forward).parameters)
    expected = ["self", "lm_head", "hidden_states", "embedding_bias", "skip_gather"]
    if params != expected:
        raise RuntimeError(f"vLLM LogitsProcessor.forward has parameters {params}, expected {expected}")
    if not hasattr(PluggableLayer, "register_oot"):
        raise RuntimeError("vLLM PluggableLayer.register_oot is missing")
    fields = set(getattr(BatchUpdate, "__dataclass_fields__", {}))
    if not {"batch_size", "removed", "added", "moved"} <= fields:
        raise RuntimeError(f"vLLM BatchUpdate fields changed: {sorted(fields)}")
    if {m.name for m in MoveDirectionality} != {"UNIDIRECTIONAL", "SWAP"}:
        raise RuntimeError("vLLM MoveDirectionality members changed")


def register_plugin() -> None:
    """The `vllm.general_plugins` entry point: swap in the steered logits layer. vLLM loads
    plugins in every process, possibly more than once, so this is idempotent."""
    check_vllm_internals()
    current = op_registry_oot.get(OOT_LAYER_NAME)
    if current is SteeredLogitsLayer:
        return
    if current is not None:
        raise RuntimeError(f"another plugin already replaced vLLM's LogitsProcessor layer: {current}")
    PluggableLayer.register_oot(SteeredLogitsLayer, name=OOT_LAYER_NAME)


def refuse_model_runner_v2(vllm_config: VllmConfig) -> None:
    if vllm_config.use_v2_model_runner:
        raise RuntimeError(
            "vllm-steer supports only vLLM's legacy model runner so far; Model Runner V2 is active. "
            "Set VLLM_USE_V2_MODEL_RUNNER=0 to steer (never serving unsteered text silently instead)."
        )


@cache
def served_config() -> SteerConfig:
    """The steers this server loaded (from VLLM_STEER_CONFIG), read once per process."""
    config = SteerConfig.from_env()
    if config is None or not config.steers:
        raise RuntimeError(
            f"no steers configured: set {ENV_VAR} (vllm-steer serve does) or use vllm_steer.offline.steered_llm"
        )
    return config


@dataclass
class _StepState:
    """What the state processor hands the logits layer for the coming step."""

    bank: SteerBank | None = None
    row_values: torch.Tensor | None = None  # [max_num_seqs, K_total] fp32, on the model's device
    armed_rows: int = 0  # the next compute_logits with this many rows is the step's sampling call
    steered: bool = False  # any row of the armed batch has nonzero values
    model_checked: bool = False  # set by the steered layer's first call: it is in the model
    vocab_size: int = 0

    def check_model(self, lm_head: torch.nn.Module, hidden_size: int) -> None:
        """Once, at the first logits computation (vLLM's start-up profile run): each steer
        must fit this model's output embedding, or the server does not start."""
        self.model_checked = True
        weight = getattr(lm_head, "weight", None)
        shard = getattr(lm_head, "shard_indices", None)
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden_size or shard is None:
            logger.warning("vllm-steer: the LM head is not a plain [V, D] weight; embedding fingerprints not checked")
            return
        config = served_config()
        for name, header in config.catalog.items():
            if header.fingerprint is None:
                continue
            problem = fingerprint_mismatch(header.fingerprint, weight[: shard.num_org_elements],
                                           first_row=shard.org_vocab_start_index, vocab_size=self.vocab_size)
            if problem:
                raise SteerFileError(
                    f"steer {name!r} ({config.steers[name]}) does not fit this model's output embedding: {problem}"
                    + (f"; it was made for {header.base_model}" if header.base_model else "")
                )

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Steer the step's sampling rows; anything else (profiling, prompt logprobs, a
        draft model) passes through untouched."""
        if self.armed_rows != hidden_states.shape[0]:
            return hidden_states
        self.armed_rows = 0
        if not self.steered:
            return hidden_states
        bank = self.bank
        if bank.down.device != hidden_states.device:
            bank.to(hidden_states.device, torch.float32)
        rows = hidden_states.shape[0]
        return steer_hidden(hidden_states, bank.down, bank.up, bank.col_dim, self.row_values[:rows])


_STEP = _StepState()


class SteeredLogitsLayer(VllmLogitsLayer):
    """vLLM's logits layer with the steer applied to the hidden state first.

    Reads nothing from `self`: under LoRA, vLLM calls this forward with its LoRA wrapper as
    `self`."""

    def forward(
        self,
        lm_head: torch.nn.Module,
        hidden_states: torch.Tensor,
        embedding_bias: torch.Tensor | None = None,
        skip_gather: bool = False,
    ) -> torch.Tensor | None:
        if _STEP.bank is not None:
            if not _STEP.model_checked:
                _STEP.check_model(lm_head, _STEP.bank.hidden_size)
            hidden_states = _STEP.take(hidden_states)
        return VllmLogitsLayer.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)


class SteerLogitsProcessor(V1LogitsProcessor):
    """Per-request steer values for vLLM's legacy model runner (the V1 logits-processor
    interface). It edits no logits itself: it keeps the row table the logits layer reads."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the API front end for every request: a ValueError here is an HTTP 400."""
        extra = sampling_params.extra_args
        if not extra or not any(isinstance(k, str) and k.startswith(STEER_KEY_PREFIX) for k in extra):
            return
        config = served_config()
        request = parse_steer_args(extra, config.catalog, config.max_abs_value)
        if request and sampling_params.prompt_logprobs is not None:
            raise SteerRequestError("prompt_logprobs cannot be combined with steering (they would be unsteered)")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        refuse_model_runner_v2(vllm_config)
        # The model is built after this runs: make sure it gets the steered layer even where
        # VLLM_PLUGINS keeps the entry point from loading.
        register_plugin()
        self.config = served_config()
        hidden_size = vllm_config.model_config.get_hidden_size()
        for name, header in self.config.catalog.items():
            check_fits_model(header, hidden_size, f"steer {name!r} ({self.config.steers[name]})")
        bank = self.config.load_bank()
        capacity = vllm_config.scheduler_config.max_num_seqs
        # Pageable, not pinned: a copy from pageable memory has read the source before it
        # returns, so the next step may rewrite this table while the GPU is still behind.
        self.values_cpu = torch.zeros(capacity, bank.num_dims, dtype=torch.float32)
        self.values = self.values_cpu if device.type == "cpu" else torch.zeros_like(self.values_cpu, device=device)
        self.row_steered = np.zeros(capacity, dtype=bool)
        self.bank = bank.to(device, torch.float32)
        self.batch_size = 0
        self.steered = False
        _STEP.bank, _STEP.row_values = self.bank, self.values
        _STEP.vocab_size = vllm_config.model_config.get_vocab_size()
        logger.info("vllm-steer: loaded steers %s (K_total=%d, R=%d)", ", ".join(self.config.steers),
                    bank.num_dims, bank.total_rank)

    def _set_row(self, row: int, params: SamplingParams) -> None:
        request = parse_steer_args(params.extra_args, self.config.catalog, self.config.max_abs_value)
        values = self.bank.row_values(request) if request else None
        if values is None:
            self.values_cpu[row].zero_()
        else:
            self.values_cpu[row] = torch.tensor(values, dtype=torch.float32)
        self.row_steered[row] = values is not None and any(values)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for row in batch_update.removed:
                self.values_cpu[row].zero_()
                self.row_steered[row] = False
            for row, params, _, _ in batch_update.added:
                self._set_row(row, params)
            for src, dst, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    self.values_cpu[[src, dst]] = self.values_cpu[[dst, src]]
                    self.row_steered[[src, dst]] = self.row_steered[[dst, src]]
                else:
                    self.values_cpu[dst] = self.values_cpu[src]
                    self.row_steered[dst] = self.row_steered[src]
                    self.values_cpu[src].zero_()
                    self.row_steered[src] = False
            self.batch_size = batch_update.batch_size
            self.steered = bool(self.row_steered[: self.batch_size].any())
            if self.steered and not _STEP.model_checked:
                raise RuntimeError("vllm-steer: the model has no steered logits layer; refusing to serve unsteered")
            if self.steered and self.values is not self.values_cpu:
                self.values[: self.batch_size].copy_(self.values_cpu[: self.batch_size], non_blocking=True)
        _STEP.armed_rows = self.batch_size
        _STEP.steered = self.steered

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        # apply() leaves logits alone; the steering happened before the LM head.
        return True
