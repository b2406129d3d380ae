"""The vLLM contact surface, checked in one place: the vLLM version and every internal the plugin
relies on are asserted at start-up, and the three patches of vLLM are installed here (the steered
logits layer registered out of tree, steered beam search refused in the front end, Model Runner
V2's `sample` wrapped to hand the layer each step's logits-row -> slot map), plus the worker
method the runtime registry calls."""

from __future__ import annotations

import functools
import inspect

import torch
import vllm
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vllm_steer.steer.values import SteerRequestError, has_steer_keys

from .layer import SteeredLogitsLayer
from .metrics import METRICS
from .registry import WORKER_METHODS
from .step import STEP

SUPPORTED_VLLM = ("0.32.",)
OOT_LAYER_NAME = "LogitsProcessor"


def check_vllm_internals() -> None:
    """Fail loudly at start-up if this vLLM is not the one whose internals we rely on."""
    version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"vllm-steer supports vLLM {', '.join(SUPPORTED_VLLM)}x; found {version}")
    expect_params(VllmLogitsLayer.forward, ["self", "lm_head", "hidden_states", "embedding_bias", "skip_gather"])
    if not hasattr(PluggableLayer, "register_oot"):
        raise RuntimeError("vLLM PluggableLayer.register_oot is missing")
    fields = set(getattr(BatchUpdate, "__dataclass_fields__", {}))
    if not {"batch_size", "removed", "added", "moved"} <= fields:
        raise RuntimeError(f"vLLM BatchUpdate fields changed: {sorted(fields)}")
    if {m.name for m in MoveDirectionality} != {"UNIDIRECTIONAL", "SWAP"}:
        raise RuntimeError("vLLM MoveDirectionality members changed")
    from vllm.distributed import parallel_state

    for name in ("model_parallel_is_initialized", "get_tp_group", "get_pp_group"):
        if not hasattr(parallel_state, name):
            raise RuntimeError(f"vLLM parallel_state.{name} is missing")


def check_launcher_internals() -> None:
    """What `vllm-steer serve` calls to start several API servers or data-parallel engines: vLLM's
    own `vllm serve` dispatcher (the CPU wheel's `vllm` console script fails on its distribution
    name, so the dispatcher is called in-process)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers import cli_args
    from vllm.entrypoints.serve.utils import api_utils

    for owner, name in ((cli_args, "make_arg_parser"), (api_utils, "cli_env_setup"),
                        (ServeSubcommand, "cmd"), (ServeSubcommand, "validate")):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(f"vLLM's serve launcher changed: {getattr(owner, '__name__', owner)}.{name} is missing")
    expect_params(ServeSubcommand.cmd, ["args"])


def pipeline_stage() -> tuple[int, int]:
    """(this worker's pipeline stage, the number of stages); (0, 1) outside a distributed run."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    group = parallel_state.get_pp_group()
    return group.rank_in_group, group.world_size


def expect_params(fn: object, expected: list[str]) -> None:
    params = list(inspect.signature(fn).parameters)
    if params != expected:
        raise RuntimeError(f"vLLM {getattr(fn, '__qualname__', fn)} has parameters {params}, expected {expected}")


def require_steered_layer() -> None:
    """Refuse to start where the model was built before the steered layer was registered (Model
    Runner V2 builds logits processors after the model), rather than serve requests unsteered."""
    registered = op_registry_oot.get(OOT_LAYER_NAME)
    if registered is not SteeredLogitsLayer:
        raise RuntimeError(
            "vllm-steer: the model was built without the steered logits layer (registered in place of vLLM's "
            f"LogitsProcessor: {registered}). Model Runner V2 builds logits processors after the model, so the "
            "layer must come from the vllm_steer entry point of the vllm.general_plugins group: install vllm-steer "
            "with pip, and if VLLM_PLUGINS is set, include vllm_steer in it.")


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
    install_load_model_hook()
    # The engine-side half of the runtime registry: worker methods collective_rpc can name
    # (callables would need VLLM_ALLOW_INSECURE_SERIALIZATION).
    from vllm.v1.worker.worker_base import WorkerBase

    for name, method in WORKER_METHODS.items():
        setattr(WorkerBase, name, method)


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
        expect_params(original, ["self", "max_tokens", "default_sampling_params"])

        def to_beam_search_params(self, max_tokens, default_sampling_params=None, _original=original):
            if has_steer_keys(self.vllm_xargs):
                METRICS.rejected.labels(reason="beam_search").inc()
                raise SteerRequestError("steering cannot be combined with use_beam_search: vLLM's beam search "
                                        "drops vllm_xargs, so the answer would be unsteered", "beam_search")
            return _original(self, max_tokens, default_sampling_params)

        to_beam_search_params._vllm_steer_refusal = True
        request_class.to_beam_search_params = to_beam_search_params


def install_mrv2_sample_hook() -> None:
    """Wrap Model Runner V2's `sample` so the layer learns this step's logits-row -> slot
    map (vLLM computes the logits inside `sample`, before any processor sees the map)."""
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    original = GPUModelRunner.sample
    if getattr(original, "_vllm_steer_hook", False):
        return
    expect_params(original, ["self", "hidden_states", "input_batch", "grammar_output"])
    fields = set(InputBatch.__dataclass_fields__)
    if not {"expanded_idx_mapping", "idx_mapping_np", "num_reqs", "logits_indices"} <= fields:
        raise RuntimeError(f"vLLM MRV2 InputBatch fields changed: {sorted(fields)}")

    @functools.wraps(original)
    def sample(self, hidden_states, input_batch, grammar_output):
        table = STEP.table
        if table is not None:
            slots = input_batch.idx_mapping_np[: input_batch.num_reqs]
            STEP.arm(int(input_batch.logits_indices.shape[0]), bool(table.steered[slots].any()),
                      input_batch.expanded_idx_mapping)
        return original(self, hidden_states, input_batch, grammar_output)

    sample._vllm_steer_hook = True
    GPUModelRunner.sample = sample


def install_load_model_hook() -> None:
    """Wrap the worker's `load_model` (both model runners, GPU and CPU) so the steers meet the model
    as soon as it is loaded: whether or not vLLM then runs a warm-up (the CPU backend skips it
    without compilation, e.g. with LoRA), each steer's fingerprint is checked, the steer basis is
    placed on the model's device and its kernels compiled before the first request."""
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model
    if getattr(original, "_vllm_steer_hook", False):
        return
    expect_params(original, ["self", "load_dummy_weights"])

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if STEP.table is not None:
            attach_model(self.model_runner.get_model(), self.model_config.dtype)

    load_model._vllm_steer_hook = True
    Worker.load_model = load_model


def attach_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hand the loaded model to the step mailbox; refuse a model whose logits layer is not the
    steered one (it would serve steered requests unsteered). A pipeline stage without the LM head
    has no logits layer and nothing to steer."""
    logits_layers = [m for m in model.modules() if isinstance(m, VllmLogitsLayer)]
    if not logits_layers:
        return
    if not any(isinstance(m, SteeredLogitsLayer) for m in logits_layers):
        raise RuntimeError(
            "vllm-steer: the model was built without the steered logits layer (its logits layer is "
            f"{type(logits_layers[0]).__name__}); refusing to serve steered requests unsteered. Install vllm-steer "
            "with pip so its vllm.general_plugins entry point exists, and if VLLM_PLUGINS is set, include vllm_steer.")
    STEP.attach_model(getattr(model, "lm_head", None), next(model.parameters()).device, dtype)
