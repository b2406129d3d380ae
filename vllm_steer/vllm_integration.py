"""Every contact with vLLM internals, in one place, checked at start-up.

Two pieces cooperate inside each vLLM worker process:
- `SteerLogitsProcessor`, the per-request state processor named with `--logits-processors`:
  it keeps a fixed-capacity table of each request's steer values, indexed the way the active
  model runner indexes requests, and arms the step's sampling call.
- `SteeredLogitsLayer`, registered out of tree in place of vLLM's `LogitsProcessor` layer:
  right before the LM head it steers the post-norm hidden state of every row in one batched
  op, then runs vLLM's own logits computation unchanged.
They meet in `_STEP`, one per process. The steer changes only h -> logits, so the KV cache,
prefix caching and the prompt's hidden states are untouched.

Both model runners are supported:
- legacy (MRV1: the CPU backend, or GPU with VLLM_USE_V2_MODEL_RUNNER=0): the table is indexed
  by persistent-batch row, kept in step with vLLM's batch changes; logits row i is row i.
- Model Runner V2 (the GPU default): the table is indexed by request slot, filled by
  add_request and flushed by apply_staged_writes; the runner's `sample` is wrapped to hand the
  step's logits-row -> slot map to the layer, since vLLM gives it only to apply(), after the
  logits exist.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import vllm
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .steer_bank import SteerBank
from .steer_config import ENV_VAR, SteerConfig
from .steer_file import SteerFile, SteerFileError, check_fits_model, fingerprint_mismatch
from .steer_request import STEER_KEY_PREFIX, SteerRequestError, parse_steer_args

logger = init_logger("vllm.vllm_steer")  # under vLLM's logger: its handler, level and format

SUPPORTED_VLLM = ("0.32.",)
OOT_LAYER_NAME = "LogitsProcessor"


def check_vllm_internals() -> None:
    """Fail loudly at start-up if this vLLM is not the one whose internals we rely on."""
    version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"vllm-steer supports vLLM {', '.join(SUPPORTED_VLLM)}x; found {version}")
    _expect_params(VllmLogitsLayer.forward, ["self", "lm_head", "hidden_states", "embedding_bias", "skip_gather"])
    if not hasattr(PluggableLayer, "register_oot"):
        raise RuntimeError("vLLM PluggableLayer.register_oot is missing")
    fields = set(getattr(BatchUpdate, "__dataclass_fields__", {}))
    if not {"batch_size", "removed", "added", "moved"} <= fields:
        raise RuntimeError(f"vLLM BatchUpdate fields changed: {sorted(fields)}")
    if {m.name for m in MoveDirectionality} != {"UNIDIRECTIONAL", "SWAP"}:
        raise RuntimeError("vLLM MoveDirectionality members changed")
    from vllm.distributed import parallel_state

    for name in ("model_parallel_is_initialized", "get_tp_group"):
        if not hasattr(parallel_state, name):
            raise RuntimeError(f"vLLM parallel_state.{name} is missing")


def _expect_params(fn: object, expected: list[str]) -> None:
    params = list(inspect.signature(fn).parameters)
    if params != expected:
        raise RuntimeError(f"vLLM {getattr(fn, '__qualname__', fn)} has parameters {params}, expected {expected}")


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
    install_beam_search_refusal()
    # The engine-side half of the runtime registry: a worker method collective_rpc can name
    # (callables would need VLLM_ALLOW_INSECURE_SERIALIZATION).
    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.vllm_steer_reconfigure = _reconfigure_worker


def _has_steer_keys(extra: object) -> bool:
    return bool(extra) and any(isinstance(k, str) and k.startswith(STEER_KEY_PREFIX) for k in extra)


def install_beam_search_refusal() -> None:
    """vLLM's beam search builds its own per-step SamplingParams without the request's
    vllm_xargs, so a steered beam search would be answered unsteered, and a wrong steer name
    never checked. Refuse it in the API front end (a ValueError there is an HTTP 400)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request_class in (CompletionRequest, ChatCompletionRequest):
        original = request_class.to_beam_search_params
        if getattr(original, "_vllm_steer_refusal", False):
            continue
        _expect_params(original, ["self", "max_tokens", "default_sampling_params"])

        def to_beam_search_params(self, max_tokens, default_sampling_params=None, _original=original):
            if _has_steer_keys(self.vllm_xargs):
                METRICS.rejected.labels(reason="beam_search").inc()
                raise SteerRequestError("steering cannot be combined with use_beam_search: vLLM's beam search "
                                        "drops vllm_xargs, so the answer would be unsteered", "beam_search")
            return _original(self, max_tokens, default_sampling_params)

        to_beam_search_params._vllm_steer_refusal = True
        request_class.to_beam_search_params = to_beam_search_params


def served_config() -> SteerConfig:
    """The steers this server loaded (from VLLM_STEER_CONFIG)."""
    global _SERVED_CONFIG
    if _SERVED_CONFIG is None:
        config = SteerConfig.from_env()
        if config is None or not config.steers:
            raise RuntimeError(f"no steers configured: set {ENV_VAR} (vllm-steer serve does) "
                               "or use vllm_steer.offline.steered_llm")
        _SERVED_CONFIG = config
    return _SERVED_CONFIG


_SERVED_CONFIG: SteerConfig | None = None


def _set_served_config(config: SteerConfig) -> None:
    global _SERVED_CONFIG
    _SERVED_CONFIG = config


class _SteerMetrics:
    """Prometheus metrics, counted in the API front end at request admission and served on
    vLLM's own /metrics."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("vllm_steer_requests", "Admitted requests that use a steer, by steer", ["steer"])
        self.values = Histogram("vllm_steer_value", "Primary-dim value of admitted steered requests", ["steer"],
                                buckets=(-20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20))
        self.rejected = Counter("vllm_steer_rejected", "Requests refused for their steer values, by reason",
                                ["reason"])


METRICS = _SteerMetrics()


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
        table = SteerTable(config, files, self.host.shape[0] - 1, self.device_type)
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


@dataclass
class _StepState:
    """What the state processor hands the logits layer for the coming sampling call."""

    table: SteerTable | None = None
    armed_rows: int = 0  # the next compute_logits with this many rows is the step's sampling call
    steered: bool = False  # any row of the armed step has nonzero values
    row_to_index: torch.Tensor | None = None  # MRV2: logits row -> slot; MRV1: None (row i is row i)
    layer_seen: bool = False  # set by the steered layer's first call: it is in the model
    vocab_size: int = 0
    lm_head: torch.nn.Module | None = None  # kept to check steers loaded at run time

    def arm(self, rows: int, steered: bool, row_to_index: torch.Tensor | None = None) -> None:
        self.armed_rows, self.steered, self.row_to_index = rows, steered, row_to_index
        if steered and not self.layer_seen:
            raise RuntimeError("vllm-steer: the model has no steered logits layer; refusing to serve unsteered")

    def check_model(self, lm_head: torch.nn.Module) -> None:
        """Once, at the first logits computation (vLLM's start-up profile run): each steer
        must fit this model's output embedding, or the server does not start."""
        self.layer_seen, self.lm_head = True, lm_head
        self.check_fingerprints(self.table.config)

    def check_fingerprints(self, config: SteerConfig, names: list[str] | None = None) -> None:
        weight = getattr(self.lm_head, "weight", None)
        shard = getattr(self.lm_head, "shard_indices", None)
        hidden_size = self.table.bank.hidden_size
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden_size or shard is None:
            logger.warning("vllm-steer: the LM head is not a plain [V, D] weight; embedding fingerprints not checked")
            return
        names = [n for n in (names if names is not None else config.steers) if config.catalog[n].fingerprint]
        problems = [fingerprint_mismatch(config.catalog[n].fingerprint, weight[: shard.num_org_elements],
                                         first_row=shard.org_vocab_start_index, vocab_size=self.vocab_size)
                    for n in names]
        refused = _refused_by_any_tp_rank([p is not None for p in problems], weight.device)
        for name, problem, refuse in zip(names, problems, refused, strict=True):
            if refuse:
                base_model = config.catalog[name].base_model
                raise SteerFileError(
                    f"steer {name!r} ({config.steers[name]}) does not fit this model's output embedding: "
                    + (problem or "another tensor-parallel rank found a mismatch in its vocabulary shard")
                    + (f"; it was made for {base_model}" if base_model else "")
                )

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Steer the step's sampling rows; anything else (profiling, prompt logprobs, a
        draft model) passes through untouched."""
        if self.armed_rows != hidden_states.shape[0]:
            return hidden_states
        self.armed_rows = 0
        if not self.steered:
            return hidden_states
        table, bank = self.table, self.table.bank
        # fp32 weights (exact, and what the CPU torch op computes in anyway), except on a GPU
        # serving a half-precision model, where the kernel reads the weights in the model's
        # dtype: half the bytes, and within the rounding the model's own hidden state has.
        weight_dtype = hidden_states.dtype if hidden_states.is_cuda else torch.float32
        if weight_dtype not in (torch.bfloat16, torch.float16):
            weight_dtype = torch.float32
        if bank.placement != (hidden_states.device, weight_dtype):
            bank.to(hidden_states.device, weight_dtype)
            logger.info("vllm-steer: steer basis on %s in %s, %s", hidden_states.device, weight_dtype,
                        "as dense W_k (one GEMM)" if bank.dense is not None else f"as factors (R={bank.total_rank})")
        rows = hidden_states.shape[0]
        values = table.device[:rows] if self.row_to_index is None else table.device[self.row_to_index]
        return bank.steer(hidden_states, values)


_STEP = _StepState()


def _refused_by_any_tp_rank(refused_here: list[bool], device: torch.device) -> list[bool]:
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
        if _STEP.table is not None:
            if not _STEP.layer_seen:
                _STEP.check_model(lm_head)
            hidden_states = _STEP.take(hidden_states)
        return VllmLogitsLayer.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)


def install_mrv2_sample_hook() -> None:
    """Wrap Model Runner V2's `sample` so the layer learns this step's logits-row -> slot
    map (vLLM computes the logits inside `sample`, before any processor sees the map)."""
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    original = GPUModelRunner.sample
    if getattr(original, "_vllm_steer_hook", False):
        return
    _expect_params(original, ["self", "hidden_states", "input_batch", "grammar_output"])
    fields = set(InputBatch.__dataclass_fields__)
    if not {"expanded_idx_mapping", "idx_mapping_np", "num_reqs", "logits_indices"} <= fields:
        raise RuntimeError(f"vLLM MRV2 InputBatch fields changed: {sorted(fields)}")

    @functools.wraps(original)
    def sample(self, hidden_states, input_batch, grammar_output):
        table = _STEP.table
        if table is not None:
            slots = input_batch.idx_mapping_np[: input_batch.num_reqs]
            _STEP.arm(int(input_batch.logits_indices.shape[0]), bool(table.steered[slots].any()),
                      input_batch.expanded_idx_mapping)
        return original(self, hidden_states, input_batch, grammar_output)

    sample._vllm_steer_hook = True
    GPUModelRunner.sample = sample


class SteerLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Per-request steer values, for either model runner: vLLM loads it through the V1
    interface under the legacy runner and through the V2 interface under Model Runner V2.
    It edits no logits itself; it keeps the table the logits layer reads."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the API front end for every request: a ValueError here is an HTTP 400."""
        extra = sampling_params.extra_args
        if not _has_steer_keys(extra):
            return
        config = served_config()
        try:
            request = parse_steer_args(extra, config.catalog, config.value_bounds)
            if request and sampling_params.prompt_logprobs is not None:
                raise SteerRequestError("prompt_logprobs cannot be combined with steering (they would be unsteered)",
                                        "prompt_logprobs")
        except SteerRequestError as e:
            METRICS.rejected.labels(reason=e.reason).inc()
            raise
        for name, values in request.items():
            METRICS.requests.labels(steer=name).inc()
            METRICS.values.labels(steer=name).observe(values[config.catalog[name].primary_index])

    def __init__(self, vllm_config: VllmConfig, *runner_args: object) -> None:
        """MRV1 passes (device, is_pin_memory); MRV2 passes (req_states)."""
        # The model is built after this runs: make sure it gets the steered layer even where
        # VLLM_PLUGINS keeps the entry point from loading.
        register_plugin()
        self.v2 = bool(vllm_config.use_v2_model_runner)
        if self.v2:
            if vllm_config.parallel_config.enable_batch_sharded_sampling:
                raise RuntimeError("vllm-steer does not support batch-sharded sampling; turn it off to steer")
            (req_states,) = runner_args
            device, capacity = req_states.device, req_states.max_num_reqs
            install_mrv2_sample_hook()
        else:
            device, _ = runner_args
            capacity = vllm_config.scheduler_config.max_num_seqs
        config = served_config()
        files = load_fitting_steers(config, list(config.steers), vllm_config.model_config.get_hidden_size())
        self.batch_size = 0
        self.steered = False
        self.staged = False
        _STEP.table = SteerTable(config, files, capacity, torch.device(device))
        _STEP.vocab_size = vllm_config.model_config.get_vocab_size()
        bank = _STEP.table.bank
        logger.info("vllm-steer: loaded steers %s (K_total=%d, R=%d, %s)", ", ".join(config.steers),
                    bank.num_dims, bank.total_rank, "model runner V2" if self.v2 else "legacy model runner")

    @property
    def table(self) -> SteerTable:
        # Not kept on self: a runtime load or unload replaces the process's table.
        return _STEP.table

    # -- legacy model runner (V1 interface): rows of the persistent batch
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        table = self.table
        if batch_update is not None:
            for row in batch_update.removed:
                table.clear(row)
            for row, params, _, _ in batch_update.added:
                table.set(row, params)
            for src, dst, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    table.swap(src, dst)
                else:
                    table.move(src, dst)
            self.batch_size = batch_update.batch_size
            self.steered = bool(table.steered[: self.batch_size].any())
            if self.steered:
                table.flush(self.batch_size)
        _STEP.arm(self.batch_size, self.steered)

    def is_argmax_invariant(self) -> bool:
        # apply() leaves logits alone; the steering happened before the LM head.
        return True

    # -- Model Runner V2 (V2 interface): request slots, recycled without a remove callback
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        self.table.set(req_idx, sampling_params)
        self.staged = True
        return False  # apply() edits nothing

    def apply_staged_writes(self) -> None:
        if self.staged:
            self.table.flush()
            self.staged = False

    def apply(self, logits: torch.Tensor, ctx: object = None) -> torch.Tensor:
        return logits


def load_fitting_steers(config: SteerConfig, names: list[str], hidden_size: int) -> dict[str, SteerFile]:
    for name in names:
        check_fits_model(config.catalog[name], hidden_size, f"steer {name!r} ({config.steers[name]})")
    return {name: SteerFile.load(config.steers[name]) for name in names}


def _reconfigure_worker(worker: object, config_json: str) -> dict:
    """The worker half of load/unload, run in every worker through collective_rpc between
    engine steps: serve the new steer set from the next step on. Raises (and changes
    nothing) if an added steer does not fit the model."""
    table = _STEP.table
    if table is None:
        raise RuntimeError("vllm-steer is not active in this worker (no SteerLogitsProcessor)")
    served = SteerConfig.from_json(config_json)
    added = [n for n in served.steers if n not in table.files]
    files = load_fitting_steers(served, added, table.bank.hidden_size)
    _STEP.check_fingerprints(served, added)
    _STEP.table = table.reconfigured(served, files)
    return {"steers": list(_STEP.table.files), "retired": list(_STEP.table.retired)}


# ----------------------------------------------------------------- runtime steer registry (HTTP)

RUNTIME_UPDATES_ENV = "VLLM_STEER_ALLOW_RUNTIME_UPDATES"
_REGISTRY_LOCK = asyncio.Lock()


def runtime_updates_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATES_ENV, "").lower() in ("1", "true")


def describe_steers(config: SteerConfig) -> list[dict]:
    return [{"name": name, "path": config.steers[name], "dim_names": list(h.dim_names), "primary_dim": h.primary_dim,
             "bias_dims": h.bias_dims, "epsilon": h.epsilon, "rank": h.rank, "hidden_size": h.hidden_size,
             "base_model": h.base_model, "max_abs_value": config.value_bounds[name],
             "fingerprint": h.fingerprint is not None}
            for name, h in config.catalog.items()]


class LoadSteerRequest(BaseModel):
    name: str
    path: str
    max_abs_value: float | None = None


class UnloadSteerRequest(BaseModel):
    name: str


class SteerEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded only when VLLM_PLUGINS names
    vllm_steer): GET /v1/steers always; POST /v1/load_steer and /v1/unload_steer only with
    VLLM_STEER_ALLOW_RUNTIME_UPDATES=1, as vLLM gates runtime LoRA updates."""

    name = "vllm_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        def error(status: int, message: str) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "BadRequestError" if status == 400
                                           else "NotFoundError", "code": status}}, status_code=status)

        router = APIRouter()

        @router.get("/v1/steers")
        async def list_steers() -> dict:
            return {"object": "list", "data": describe_steers(served_config())}

        if runtime_updates_allowed():

            @router.post("/v1/load_steer")
            async def load_steer(body: LoadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = served_config()
                    try:
                        new = current.with_steer(body.name, body.path, body.max_abs_value)
                        SteerFile.load(new.steers[body.name])  # shapes, NaN, format: before any worker sees it
                        new.value_bounds  # noqa: B018 (reads the header, checks the bound)
                    except (ValueError, OSError) as e:
                        return error(400, f"cannot load steer {body.name!r}: {e}")
                    try:
                        await raw.app.state.vllm_steer_engine.collective_rpc(
                            "vllm_steer_reconfigure", args=(new.to_json(),))
                    except Exception as e:  # the workers refused it (hidden size, fingerprint): nothing changed
                        return error(400, f"cannot load steer {body.name!r}: {e}")
                    _set_served_config(new)
                    return {"loaded": body.name, "steers": list(new.steers)}

            @router.post("/v1/unload_steer")
            async def unload_steer(body: UnloadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = served_config()
                    if body.name not in current.steers:
                        return error(404, f"no steer named {body.name!r} is loaded")
                    new = current.without_steer(body.name)
                    # The front end first: from now on requests naming it are refused; requests
                    # already admitted keep it until they finish.
                    _set_served_config(new)
                    await raw.app.state.vllm_steer_engine.collective_rpc(
                        "vllm_steer_reconfigure", args=(new.to_json(),))
                    return {"unloaded": body.name, "steers": list(new.steers)}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.vllm_steer_engine = engine_client
