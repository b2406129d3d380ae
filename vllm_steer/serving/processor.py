"""The per-request state processor named with `--logits-processors`: it validates requests in the API front
end and, in each worker, keeps every request's steer values in the worker's table, for either model
runner. It edits no logits itself; the steered logits layer reads the table."""

from __future__ import annotations

import socket
import time

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from vllm_steer.log import logger
from vllm_steer.steer.values import SteerRequestError, has_steer_keys

from .config import ENV_VAR, SteerConfig, expected_steer_digest, steer_set_digest
from .front_end import admitted
from .metrics import METRICS
from .table import SteerTable
from .vllm_patches import install_patches, mark_legacy_sampling, mark_mrv2_sampling, require_steered_layer
from .worker import SamplingRows, worker_steering


class SteerLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Per-request steer values, for either model runner: vLLM loads it through the V1 interface under the
    legacy runner and through the V2 interface under Model Runner V2."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the API front end for every request: a ValueError here is an HTTP 400."""
        extra = sampling_params.extra_args
        if not has_steer_keys(extra):
            return
        steers = admitted()
        try:
            request = steers.parse(extra)
            # Prompt logprobs (of the top tokens or of chosen token ids) are computed from the prompt's
            # hidden states, which the steer does not touch: they would be the unsteered model's.
            for field in ("prompt_logprobs", "prompt_logprob_token_ids"):
                if request and getattr(sampling_params, field) is not None:
                    raise SteerRequestError(f"{field} cannot be combined with steering (they would be unsteered)",
                                            field)
        except SteerRequestError as e:
            METRICS.rejected.labels(reason=e.reason).inc()
            raise
        for name, values in request.items():
            METRICS.requests.labels(steer=name).inc()
            METRICS.values.labels(steer=name).observe(values[steers.catalog[name].primary_index])

    def __init__(self, vllm_config: VllmConfig, *runner_args: object) -> None:
        """The legacy runner passes (device, is_pin_memory); Model Runner V2 passes (req_states)."""
        self.v2 = bool(vllm_config.use_v2_model_runner)
        if self.v2:
            # Model Runner V2 builds its logits processors after the model: the steered layer must already
            # be in it, registered by the vllm.general_plugins entry point.
            require_steered_layer()
            if vllm_config.parallel_config.enable_batch_sharded_sampling:
                raise RuntimeError("vllm-steer does not support batch-sharded sampling; turn it off to steer")
            (req_states,) = runner_args
            device, capacity = req_states.device, req_states.max_num_reqs
            mark_mrv2_sampling()
        else:
            # The legacy runner builds its processors before the model: installing here gives the model the
            # steered layer even where VLLM_PLUGINS keeps the entry point from loading.
            install_patches()
            mark_legacy_sampling()
            device, _ = runner_args
            capacity = vllm_config.scheduler_config.max_num_seqs
        self.steering = worker_steering()
        self.batch_size = 0
        self.steered = False
        self.staged = False
        stage, stages = pipeline_stage()
        # Only the last pipeline stage computes logits (the others hand their activations on): the others load
        # no steer and do nothing per step.
        self.active = stage == stages - 1
        if not self.active:
            self.steering.stand_idle(f"pipeline stage {stage + 1} of {stages}")
            logger.info("vllm-steer: %s computes no logits (the last stage steers): no steers loaded here, "
                        "nothing to do per step", self.steering.idle_stage)
            return
        config = SteerConfig.from_env()
        if config is None or not config.steers:
            raise RuntimeError(f"no steers configured: set {ENV_VAR} (vllm-steer serve does) or use "
                               "vllm_steer.steered_llm")
        began = time.perf_counter()
        table = SteerTable.load(config, capacity, torch.device(device), vllm_config.model_config.get_hidden_size())
        spec = vllm_config.speculative_config
        self.steering.serve(table, vllm_config.model_config.get_vocab_size(),
                            capacity * (1 + (spec.num_speculative_tokens if spec else 0)))
        check_steer_set(config, table.file_sha256, vllm_config.additional_config)
        names = table.bank.names
        logger.info("vllm-steer: loaded %d steers in %.1f s (%s), up to %d per request; %s%s", len(names),
                    time.perf_counter() - began, ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""),
                    config.max_steers_per_request, "model runner V2" if self.v2 else "legacy model runner",
                    f"; pipeline stage {stage + 1} of {stages} (the last: it computes the logits)"
                    if stages > 1 else "")

    @property
    def table(self) -> SteerTable | None:
        # Not kept on self: a runtime load or unload replaces the worker's table.
        return self.steering.table

    # -- legacy model runner (V1 interface): rows of the persistent batch
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.active:
            return
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
        # The legacy runner computes the sampling logits from one row per request of the persistent batch.
        self.steering.arm(SamplingRows(self.batch_size, self.steered))

    def is_argmax_invariant(self) -> bool:
        # apply() leaves logits alone; the steering happened before the LM head.
        return True

    # -- Model Runner V2 (V2 interface): request slots, recycled without a remove callback
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        if not self.active:
            return False
        self.table.set(req_idx, sampling_params)
        self.staged = True
        return False  # apply() edits nothing

    def apply_staged_writes(self) -> None:
        if self.staged and self.active:
            self.table.flush()
            self.staged = False

    def apply(self, logits: torch.Tensor, ctx: object = None) -> torch.Tensor:
        return logits


def pipeline_stage() -> tuple[int, int]:
    """(this worker's pipeline stage, the number of stages); (0, 1) outside a distributed run."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    group = parallel_state.get_pp_group()
    return group.rank_in_group, group.world_size


def check_steer_set(config: SteerConfig, file_sha256: dict[str, str], additional_config: object) -> None:
    """Refuse to start a worker whose steer set differs from the one the front end started with
    (`vllm-steer serve` puts its digest in --additional-config, which travels inside vLLM's engine
    configuration, while the steer set itself travels in the environment, which a node may not
    refresh: vLLM's Ray executor only fills in variables a node's workers lack)."""
    expected = expected_steer_digest(additional_config)
    if expected is None:
        return
    got = steer_set_digest(config, file_sha256)
    if got == expected:
        logger.info("vllm-steer: steer set %s on node %s: the one the front end started with", got[:16],
                    socket.gethostname())
        return
    steers = ", ".join(f"{name} (sha256 {sha[:12]}, {config.steers[name]})"
                       for name, sha in sorted(file_sha256.items()))
    raise RuntimeError(
        f"vllm-steer: the steer set this worker (node {socket.gethostname()}) received is not the one the front end "
        f"started with: steer set digest {got[:16]} here, {expected[:16]} from the front end (--additional-config "
        f"{{\"vllm_steer\": ...}}). This worker read {ENV_VAR} = {len(config.steers)} steers: {steers}; bounds "
        f"{config.bounds}, max |value| {config.max_abs_value:g}, {config.max_steers_per_request} per request. "
        "Compare them with the front end's start-up lines (`vllm-steer: steer NAME <- PATH (sha256 ...)`). Either "
        f"this node's environment holds another {ENV_VAR} (vLLM's Ray executor never overwrites a variable a node's "
        "workers already have: restart that node's Ray from an environment without it), or the files at these paths "
        "differ on this node: copy the front end's files there. Refusing to start rather than serve other steers "
        "than the front end admits.")
