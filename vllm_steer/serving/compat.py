"""The plugin's patches of vLLM, installed in every process that serves steers once the internals they
touch are checked (serving/vllm_internals.py): the steered logits layer registered out of tree, steered
beam search refused in the API front end, Model Runner V2's `sample` wrapped to hand the layer each
step's logits-row -> slot map, the worker's `load_model` wrapped so the steers meet the model, and the
worker methods the runtime registry calls."""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer

from vllm_steer.steer.values import SteerRequestError, has_steer_keys

from .layer import SteeredLogitsLayer
from .metrics import METRICS
from .registry import WORKER_METHODS
from .step import STEP
from .vllm_internals import BEAM_SEARCH_REQUESTS, check_internals, resolve

OOT_LAYER_NAME = "LogitsProcessor"


def pipeline_stage() -> tuple[int, int]:
    """(this worker's pipeline stage, the number of stages); (0, 1) outside a distributed run."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    group = parallel_state.get_pp_group()
    return group.rank_in_group, group.world_size


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


def install_patches() -> None:
    """Swap in the steered logits layer and install the patches below, once the internals they touch are
    checked. vLLM loads plugins in every process, possibly more than once, so this is idempotent."""
    current = op_registry_oot.get(OOT_LAYER_NAME)
    if current is SteeredLogitsLayer:
        return
    check_internals("plugin")
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
    """vLLM's beam search builds its own per-step SamplingParams without the request's vllm_xargs, so a
    steered beam search would be answered unsteered, and a wrong steer name never checked. Refuse it in the
    API front end (a ValueError there is an HTTP 400), for every request class that turns a request into
    beam-search parameters (completions, chat, transcription, translation)."""
    for name in BEAM_SEARCH_REQUESTS:
        request_class = resolve(name)
        original = request_class.to_beam_search_params
        if getattr(original, "_vllm_steer_refusal", False):
            continue

        @functools.wraps(original)
        def to_beam_search_params(self, *args, _original=original, **kwargs):
            if has_steer_keys(self.vllm_xargs):
                METRICS.rejected.labels(reason="beam_search").inc()
                raise SteerRequestError("steering cannot be combined with use_beam_search: vLLM's beam search "
                                        "drops vllm_xargs, so the answer would be unsteered", "beam_search")
            return _original(self, *args, **kwargs)

        to_beam_search_params._vllm_steer_refusal = True
        request_class.to_beam_search_params = to_beam_search_params


def install_mrv2_sample_hook() -> None:
    """Wrap Model Runner V2's `sample` so the layer learns this step's logits-row -> slot
    map (vLLM computes the logits inside `sample`, before any processor sees the map)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    original = GPUModelRunner.sample
    if getattr(original, "_vllm_steer_hook", False):
        return
    check_internals("model_runner_v2")

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
