"""Every change vllm-steer makes to vLLM, in one place, each installed once the internals it touches are
checked (serving/vllm_internals.py lists them):

1. `PluggableLayer.register_oot(SteeredLogitsLayer, name="LogitsProcessor")`
   (vllm.model_executor.custom_op): every model's logits layer is the steered one, so the post-norm
   hidden state that feeds the LM head (the paper's h) is steered, in every process (`install_patches`).
2. `to_beam_search_params` of the completion, chat, transcription and translation request classes
   (vllm.entrypoints.*.protocol), wrapped: vLLM's beam search drops vllm_xargs, so a steered beam search
   is refused in the API front end rather than answered unsteered.
3. `Worker.load_model` (vllm.v1.worker.gpu_worker; the CPU worker inherits it), wrapped: the worker's
   steering meets the model as soon as it is loaded (fingerprints checked, steers placed, kernels compiled),
   whether or not a warm-up follows.
4. `WorkerBase` (vllm.v1.worker.worker_base) gets the methods `vllm_steer_prepare`, `_commit` and
   `_discard`: the runtime registry's collective_rpc names them (a callable would need
   VLLM_ALLOW_INSECURE_SERIALIZATION).
5. The legacy runner's `GPUModelRunner.execute_model` (vllm.v1.worker.gpu_model_runner; the CPU runner
   inherits it), wrapped when its state processor is built: the step's sampling logits are computed inside
   it, so the steered layer's call there is the one to steer.
6. Model Runner V2's `GPUModelRunner.sample` (vllm.v1.worker.gpu.model_runner), wrapped when its state
   processor is built: the same window, with the step's logits-row -> slot map (vLLM computes the logits
   inside `sample`, before any processor sees the map).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer

from vllm_steer.steer.values import SteerRequestError, has_steer_keys

from .layer import SteeredLogitsLayer
from .metrics import METRICS
from .vllm_internals import BEAM_SEARCH_REQUESTS, check_internals, resolve
from .worker import RPC_METHODS, RPC_PREFIX, SamplingRows, worker_steering

OOT_LAYER_NAME = "LogitsProcessor"
PATCHED_MARK = "_vllm_steer_patch"  # set on every wrapper installed here
WITHOUT_STEERED_LAYER = (
    "vllm-steer: the model was built without the steered logits layer ({found}); refusing to serve steered requests "
    "unsteered. The layer comes from vllm-steer's vllm.general_plugins entry point, which must run before the model "
    "is built (Model Runner V2 builds its logits processors after the model): install vllm-steer with pip, and if "
    "VLLM_PLUGINS is set, include vllm_steer in it.")


def install_patches() -> None:
    """Patches 1 to 4, in every process with steers configured (the general plugin; the legacy runner's state
    processor too, where VLLM_PLUGINS kept the plugin out). vLLM loads plugins in every process, possibly more
    than once, so this is idempotent."""
    current = op_registry_oot.get(OOT_LAYER_NAME)
    if current is SteeredLogitsLayer:
        return
    check_internals("plugin")
    if current is not None:
        raise RuntimeError(f"another plugin already replaced vLLM's LogitsProcessor layer: {current}")
    PluggableLayer.register_oot(SteeredLogitsLayer, name=OOT_LAYER_NAME)
    _refuse_steered_beam_search()
    _attach_on_load_model()
    from vllm.v1.worker.worker_base import WorkerBase

    for method in RPC_METHODS:
        setattr(WorkerBase, RPC_PREFIX + method, _rpc(method))


def require_steered_layer() -> None:
    """Refuse to start where the model was built before the steered layer was registered."""
    registered = op_registry_oot.get(OOT_LAYER_NAME)
    if registered is not SteeredLogitsLayer:
        raise RuntimeError(WITHOUT_STEERED_LAYER.format(found=f"registered in place of vLLM's LogitsProcessor: "
                                                              f"{registered}"))


def _refuse_steered_beam_search() -> None:
    """Patch 2: a ValueError in the API front end is an HTTP 400."""

    def refusing(original: Callable) -> Callable:
        def to_beam_search_params(self, *args, **kwargs):
            if has_steer_keys(self.vllm_xargs):
                METRICS.rejected.labels(reason="beam_search").inc()
                raise SteerRequestError("steering cannot be combined with use_beam_search: vLLM's beam search "
                                        "drops vllm_xargs, so the answer would be unsteered", "beam_search")
            return original(self, *args, **kwargs)

        return to_beam_search_params

    for name in BEAM_SEARCH_REQUESTS:
        _wrap(resolve(name), "to_beam_search_params", refusing)


def _attach_on_load_model() -> None:
    """Patch 3."""
    from vllm.v1.worker.gpu_worker import Worker

    def attaching(original: Callable) -> Callable:
        def load_model(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if worker_steering().table is not None:
                attach_model(self.model_runner.get_model(), self.model_config.dtype)

        return load_model

    _wrap(Worker, "load_model", attaching)


def attach_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Attach the loaded model to this worker's steering; refuse a model whose logits layer is not the steered
    one (it would serve steered requests unsteered). A pipeline stage without the LM head has no logits layer
    and nothing to steer."""
    logits_layers = [m for m in model.modules() if isinstance(m, VllmLogitsLayer)]
    if not logits_layers:
        return
    steered = [m for m in logits_layers if isinstance(m, SteeredLogitsLayer)]
    if not steered:
        raise RuntimeError(WITHOUT_STEERED_LAYER.format(found=f"its logits layer is {type(logits_layers[0]).__name__}"))
    worker_steering().attach(steered, getattr(model, "lm_head", None), next(model.parameters()).device, dtype)


def _rpc(method: str):
    """Patch 4: a worker method that runs `method` of this worker's steering."""

    def call(worker: object, *args: object) -> object:
        return getattr(worker_steering(), method)(*args)

    call.__name__ = RPC_PREFIX + method
    return call


def mark_legacy_sampling() -> None:
    """Patch 5."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_internals("legacy_runner")

    def marking(original: Callable) -> Callable:
        def execute_model(self, *args, **kwargs):
            with worker_steering().sampling():
                return original(self, *args, **kwargs)

        return execute_model

    _wrap(GPUModelRunner, "execute_model", marking)


def mark_mrv2_sampling() -> None:
    """Patch 6."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    check_internals("model_runner_v2")

    def marking(original: Callable) -> Callable:
        def sample(self, hidden_states, input_batch, grammar_output):
            steering = worker_steering()
            if steering.table is None:
                return original(self, hidden_states, input_batch, grammar_output)
            slots = input_batch.idx_mapping_np[: input_batch.num_reqs]
            step = SamplingRows(int(input_batch.logits_indices.shape[0]), bool(steering.table.steered[slots].any()),
                                input_batch.expanded_idx_mapping)
            with steering.sampling(step):
                return original(self, hidden_states, input_batch, grammar_output)

        return sample

    _wrap(GPUModelRunner, "sample", marking)


def _wrap(owner: type, name: str, wrapping: Callable[[Callable], Callable]) -> None:
    """Replace `owner.name` by `wrapping(original)`, once: vLLM loads plugins in a process more than once."""
    original = getattr(owner, name)
    if getattr(original, PATCHED_MARK, False):
        return
    wrapper = functools.wraps(original)(wrapping(original))
    setattr(wrapper, PATCHED_MARK, True)
    setattr(owner, name, wrapper)
