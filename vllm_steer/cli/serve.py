"""The serving subcommands: `serve` (vLLM's OpenAI-compatible server with steers loaded) and
`default-model` (the embedded default model's folder)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from vllm_steer.serving.config import (
    DEFAULT_MAX_ABS_VALUE,
    DEFAULT_MAX_LOAD_BYTES,
    DEFAULT_MAX_STEERS_PER_REQUEST,
    NAME_PATTERN,
    PLAYGROUND_ENV,
    RUNTIME_UPDATES_ENV,
    SteerConfig,
    resolved_roots,
    steer_set_digest,
)

from .arguments import byte_size, name_value_pairs, preset_specs, steers_in_folder

if TYPE_CHECKING:
    from vllm_steer.steer.file import SteerHeader


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start vLLM's OpenAI server with steers loaded; other args go to vLLM",
                       description="Unrecognised arguments are passed on to vLLM's server unchanged.")
    p.add_argument("model")
    p.add_argument("--steer", action="append", default=[], metavar="NAME=PATH",
                   help="load a steer file under NAME; requests use it with vllm_xargs {'steer_NAME': value}")
    p.add_argument("--steer-dir", action="append", default=[], metavar="DIR",
                   help="load every .safetensors file in DIR, each under its file name without the extension")
    p.add_argument("--max-steers-per-request", type=int, default=DEFAULT_MAX_STEERS_PER_REQUEST,
                   help="how many steers one request may compose (default %(default)s)")
    p.add_argument("--steer-memory-budget", type=byte_size, metavar="SIZE",
                   help="refuse to load steers taking more than SIZE (e.g. 512M, 2G) where they are served")
    p.add_argument("--max-load-size", type=byte_size, default=DEFAULT_MAX_LOAD_BYTES, metavar="SIZE",
                   help="the largest steer file POST /v1/load_steer accepts (sent to every worker; default 512M)")
    p.add_argument("--steer-load-dir", action="append", default=[], metavar="DIR",
                   help="a folder POST /v1/load_steer may name paths in (repeatable; without one, runtime loads "
                        "take uploads only)")
    p.add_argument("--max-abs-value", type=float, default=DEFAULT_MAX_ABS_VALUE,
                   help="largest |steer value| a request may ask for (default %(default)s)")
    p.add_argument("--steer-bound", action="append", default=[], metavar="NAME=BOUND",
                   help="a bound for one steer, overriding the file's and --max-abs-value")
    p.add_argument("--steer-preset", action="append", default=[], metavar="NAME=STEER:VALUE[,STEER:VALUE...]",
                   help="serve a preset as a model: requests whose model is NAME are steered with these values "
                        "(a VALUE is a number or a K-list as in vllm_xargs, e.g. detox:[5,1]); repeatable")
    p.add_argument("--steer-playground", action="store_true",
                   help="serve the playground page at /playground (behind --api-key like the rest)")
    p.add_argument("--steer-endpoints", action="store_true", help="serve GET /v1/steers (lists the loaded steers)")
    p.add_argument("--allow-runtime-updates", action="store_true",
                   help="also serve POST /v1/load_steer and /v1/unload_steer (implies --steer-endpoints)")
    p.set_defaults(func=run_serve, passthrough=True)


def run_serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    """Start vLLM's OpenAI-compatible server with the steers loaded, in this process as `vllm serve` does (see
    launch/plan.py). On the CPU build the KV cache is sized to the model and the operator's limits unless the
    operator sized it."""
    from vllm_steer.launch.cpu_kv_cache import choose_cpu_kv_cache, is_cpu_build
    from vllm_steer.launch.plan import launch, parse_vllm_args, plan_launch, prepare_environment
    from vllm_steer.serving.vllm_internals import check_internals

    check_internals("launcher")  # first: an unsupported vLLM is named before anything else is done
    steers = name_value_pairs(args.steer, "--steer", "NAME=PATH")
    for folder in args.steer_dir:
        for name, path in steers_in_folder(folder).items():
            if name in steers:
                raise ValueError(f"two steers named {name!r}: {steers[name]} and {path} (--steer-dir {folder})")
            if not NAME_PATTERN.match(name):
                raise ValueError(f"{path}: the file name gives the steer name {name!r}, which must be letters, digits "
                                 "and underscores; rename the file or load it with --steer NAME=PATH")
            steers[name] = path
    config = SteerConfig(steers=steers, bounds=name_value_pairs(args.steer_bound, "--steer-bound", "NAME=BOUND", float),
                         max_abs_value=args.max_abs_value, max_steers_per_request=args.max_steers_per_request,
                         memory_budget=args.steer_memory_budget, max_load_bytes=args.max_load_size,
                         load_dirs=resolved_roots(args.steer_load_dir), presets=preset_specs(args.steer_preset))
    headers, digest = _read_and_report(config)  # fails here, in a second, rather than after the engine starts
    namespace = parse_vllm_args(args.model, vllm_args)  # once, by vLLM's own parser
    if config.presets:  # every preset servable, before vLLM starts
        from vllm_steer.serving.front_end import AdmittedSteers
        from vllm_steer.serving.presets import check_presets, served_names

        check_presets(AdmittedSteers(replace(config, headers=headers)), *served_names(namespace))
    plan = plan_launch(namespace, vllm_args, digest, args.allow_runtime_updates)
    config.export()
    if args.steer_endpoints or args.allow_runtime_updates or config.presets or args.steer_playground:
        os.environ["VLLM_PLUGINS"] = plugins_allowlist_with_steer_endpoints(os.environ.get("VLLM_PLUGINS"))
    if args.allow_runtime_updates:
        os.environ[RUNTIME_UPDATES_ENV] = "1"
    if args.steer_playground:
        os.environ[PLAYGROUND_ENV] = "1"
    ray_line = prepare_environment()
    for note in [*plan.notes, *([ray_line] if plan.uses_ray else [])]:
        print(note, file=sys.stderr)
    if is_cpu_build():
        # vLLM's CPU worker would otherwise fill gpu_memory_utilization x the machine's memory with KV cache.
        choice = choose_cpu_kv_cache(namespace)
        print(choice.message, file=sys.stderr, flush=True)
        plan = replace(plan, argv=[*plan.argv, *choice.args])
    launch(args.model, plan)


def _read_and_report(config: SteerConfig) -> tuple[dict[str, SteerHeader], str]:
    """Read every configured steer file (raising on one that would not load) and print a line for each and
    one for the set; their headers and the steer set's digest. The tensors are not kept: this process becomes
    the API server, and the engine's workers read the files themselves."""
    loaded = config.read_files()
    headers = {name: steer.header for name, (steer, _) in loaded.items()}
    bounds = config.bounds_for(headers)
    for name, (steer, sha) in loaded.items():
        print(f"vllm-steer: steer {name!r} <- {config.steers[name]} (sha256 {sha[:12]}, |value| <= "
              f"{bounds[name]:g}, {steer.nbytes / 2**20:.2f} MiB in the file)", file=sys.stderr)
    digest = steer_set_digest(config, {name: sha for name, (_, sha) in loaded.items()})
    total = sum(steer.nbytes for steer, _ in loaded.values())
    print(f"vllm-steer: {len(config.steers)} steers, {total / 2**20:.1f} MiB in their files; steer set "
          f"{digest[:16]} (every worker checks that it loaded this set)", file=sys.stderr)
    return headers, digest


def plugins_allowlist_with_steer_endpoints(current: str | None) -> str:
    """VLLM_PLUGINS that also opts in to vllm-steer's HTTP routes. Unset means "every general
    plugin", so that list is spelled out rather than narrowed to ours."""
    from importlib.metadata import entry_points

    from vllm_steer.launch.plan import PLUGIN_NAME

    if current is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = current.split(",")
    return ",".join(dict.fromkeys([n for n in names if n] + [PLUGIN_NAME]))


def add_default_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("default-model", help="print the embedded default model's folder, preparing it if needed")
    p.set_defaults(func=run_default_model)


def run_default_model(args: argparse.Namespace) -> None:
    from vllm_steer.tools.default_model import default_model_dir

    print(default_model_dir())


COMMANDS = [add_serve, add_default_model]
