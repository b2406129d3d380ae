"""How `vllm-steer serve` starts vLLM: the operator's vLLM arguments parsed once (by vLLM's own parser), the
arguments chosen from them, and the start itself (what `vllm serve` runs, called in this process)."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from dataclasses import dataclass, field

from vllm_steer.serving.config import RAY_COPY_ENV, ray_env_vars_to_copy, with_steer_digest
from vllm_steer.serving.scale_out import externally_balanced, runtime_updates_refusal

STATE_PROCESSOR = "vllm_steer.plugin:SteerLogitsProcessor"
PLUGIN_NAME = "vllm_steer"  # its name in both of vLLM's plugin groups (setup.py)


def parse_vllm_args(model: str, vllm_args: list[str]) -> Namespace:
    """vLLM's own OpenAI-server parser over the operator's arguments: abbreviations, underscores,
    human-readable sizes and --config files resolve exactly as vLLM will resolve them. ValueError if vLLM's
    parser rejects them (it has printed why)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_steer.serving.vllm_internals import moved

    try:
        return moved("make_arg_parser")(FlexibleArgumentParser()).parse_args(["--model", model, *vllm_args])
    except SystemExit as e:
        raise ValueError("vLLM's argument parser rejected the arguments above") from e


@dataclass(frozen=True)
class LaunchPlan:
    """How `vllm-steer serve` starts vLLM: `argv`, vLLM's arguments (the operator's and ours); `notes`: what
    was decided for the operator, printed before the start; `uses_ray`: a Ray executor or DP backend."""

    argv: list[str]
    notes: list[str] = field(default_factory=list)
    uses_ray: bool = False


def plan_launch(args: Namespace, vllm_args: list[str], digest: str, runtime_updates: bool) -> LaunchPlan:
    """The vLLM arguments and launcher for a steered server, from the operator's `vllm_args` and their parse
    `args`. Refuses (ValueError) runtime updates where one front end cannot reach every engine and admit for
    all of them."""
    extra = ["--additional-config", json.dumps(with_steer_digest(args.additional_config, digest))]
    notes = []
    dp = args.data_parallel_size or 1
    api_servers = args.api_server_count
    if runtime_updates and api_servers is None and dp > 1 and not externally_balanced(args):
        # vLLM would start one API server per engine; one front end reaches them all.
        extra += ["--api-server-count", "1"]
        api_servers = 1
        notes.append(f"vllm-steer: --allow-runtime-updates with --data-parallel-size {dp}: one API server "
                     "(--api-server-count 1) reaching all engines, so that a runtime load reaches every engine "
                     "before the front end admits the new steer")
    if runtime_updates and (refusal := runtime_updates_refusal(Namespace(**{**vars(args),
                                                                            "api_server_count": api_servers}))):
        raise ValueError(refusal)
    uses_ray = "ray" in (args.distributed_executor_backend, args.data_parallel_backend)
    return LaunchPlan([*vllm_args, *extra], notes, uses_ray)


def prepare_environment() -> str:
    """Name the steer variables for vLLM's Ray executors to copy to the workers on every node (the
    legacy executor copies only listed names and prefixes), after the operator's own entries; returns
    the line to log."""
    os.environ[RAY_COPY_ENV] = ray_env_vars_to_copy(os.environ.get(RAY_COPY_ENV))
    return (f"vllm-steer: Ray: {RAY_COPY_ENV}={os.environ[RAY_COPY_ENV]} (copied to the Ray workers on every node; "
            "each worker checks that the steers it loads are the set this front end started with)")


def launch(model: str, plan: LaunchPlan) -> None:
    """Start vLLM in this process as `vllm serve` does (one API server here, or vLLM's dispatcher for several
    API servers, data parallelism and headless nodes); does not return while the server runs. In-process
    rather than a fresh interpreter: one import of vLLM fewer per start. The CPU wheel's `vllm` console
    script cannot start (it asks for a distribution named "vllm"). vLLM starts its engine cores with the
    spawn method, which re-imports the main module: the caller's must be guarded by
    `if __name__ == "__main__"` (the `vllm-steer` script and `python -m vllm_steer.cli` are)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_steer.serving.vllm_internals import moved

    _run_general_plugin_again()
    moved("cli_env_setup")()
    argv = ["--model", model, "--logits-processors", STATE_PROCESSOR, *plan.argv]
    args = moved("make_arg_parser")(FlexibleArgumentParser(prog="vllm-steer serve")).parse_args(argv)
    configure_logging_from_args(args)
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)


def _run_general_plugin_again() -> None:
    """vLLM ran its general plugins in this process when it parsed the arguments, before the steers were
    configured, and runs them once per process; this process becomes the API server, so the plugin runs
    again now, as in a new vLLM process (where VLLM_PLUGINS admits it)."""
    from vllm_steer.plugin import register_plugin

    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is None or PLUGIN_NAME in allowed.split(","):
        register_plugin()
