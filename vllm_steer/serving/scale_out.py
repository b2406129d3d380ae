"""What vLLM's scale-out modes allow a steered server: runtime steer loads need one front end that reaches every
engine, since each API server keeps its own list of admitted steers. Checked by `vllm-steer serve` before vLLM
starts and by the registry's endpoint plugin when a plain `vllm serve` front end starts. No vLLM import."""

from __future__ import annotations

from argparse import Namespace

from .config import RUNTIME_UPDATES_ENV

RUNTIME_FLAG = f"{RUNTIME_UPDATES_ENV}=1"
# vLLM's data-parallel modes in which each front end reaches only its own engines: (flag, set in the args?).
EXTERNAL_BALANCING = (
    ("--data-parallel-external-lb", lambda a: bool(getattr(a, "data_parallel_external_lb", False))),
    ("--data-parallel-rank", lambda a: getattr(a, "data_parallel_rank", None) is not None),
    ("--data-parallel-hybrid-lb", lambda a: bool(getattr(a, "data_parallel_hybrid_lb", False))),
    ("--data-parallel-start-rank", lambda a: getattr(a, "data_parallel_start_rank", None) is not None),
    ("--data-parallel-multi-port-external-lb",
     lambda a: bool(getattr(a, "data_parallel_multi_port_external_lb", False))),
)


def externally_balanced(args: Namespace) -> list[str]:
    """The flags in `args` that make each front end reach only its own data-parallel engines."""
    return [flag for flag, is_set in EXTERNAL_BALANCING if is_set(args)]


def runtime_updates_refusal(args: Namespace) -> str | None:
    """Why runtime loads and unloads cannot be served with these vLLM arguments, or None. Each API server keeps
    its own list of admitted steers, and with external or hybrid data-parallel load balancing each front end
    reaches only its own engines: a load through one would leave the others admitting a different set (vLLM
    refuses runtime LoRA updates with several API servers for the same reason)."""
    count = getattr(args, "api_server_count", None)
    if count is not None and count > 1:
        return (f"runtime steer loads (--allow-runtime-updates, {RUNTIME_FLAG}) cannot be used with "
                f"--api-server-count {count}: each API server keeps its own list of admitted steers, so a load "
                "through one would leave the others refusing the new steer and admitting unloaded ones. Run one API "
                "server (--api-server-count 1; with --data-parallel-size N one API server still reaches all N "
                "engines), or serve a fixed steer set without --allow-runtime-updates.")
    if modes := externally_balanced(args):
        return (f"runtime steer loads (--allow-runtime-updates, {RUNTIME_FLAG}) cannot be used with "
                f"{', '.join(modes)}: with external or hybrid data-parallel load balancing each front end reaches "
                "only its own engines, so a load through one would leave the other engines without the steer while "
                "their front ends admit different sets. Serve a fixed steer set there (restart every node with the "
                "new --steer list to change it), or use internal load balancing (one API server, "
                "--data-parallel-size N), where one load reaches every engine.")
    return None
