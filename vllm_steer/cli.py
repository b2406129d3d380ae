"""`vllm-steer`: a thin command line over the library. Each subcommand parses its arguments
and calls one library function."""

from __future__ import annotations

import argparse
import os
import sys

from .steer_config import SteerConfig

STATE_PROCESSOR = "vllm_steer.vllm_integration:SteerLogitsProcessor"


def cmd_serve(args: argparse.Namespace, vllm_args: list[str]) -> None:
    """Start vLLM's OpenAI-compatible server with the steers loaded. Runs the server module
    directly: the CPU wheel's `vllm serve` cannot find its own distribution."""
    from .steer_file import SteerFile

    config = SteerConfig.from_specs(args.steer, args.steer_bound, max_abs_value=args.max_abs_value)
    for name, path in config.steers.items():
        SteerFile.load(path)  # fail here, in a second, rather than after the engine starts
        print(f"vllm-steer: steer {name!r} <- {path} (|value| <= {config.value_bounds[name]:g})", file=sys.stderr)
    config.export()
    if args.steer_endpoints or args.allow_runtime_updates:
        os.environ["VLLM_PLUGINS"] = plugins_allowlist_with_steer_endpoints(os.environ.get("VLLM_PLUGINS"))
    if args.allow_runtime_updates:
        os.environ["VLLM_STEER_ALLOW_RUNTIME_UPDATES"] = "1"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--logits-processors", STATE_PROCESSOR, *vllm_args]
    os.execv(sys.executable, argv)


def plugins_allowlist_with_steer_endpoints(current: str | None) -> str:
    """VLLM_PLUGINS that also opts in to vllm-steer's HTTP routes. Unset means "every general
    plugin", so that list is spelled out rather than narrowed to ours."""
    from importlib.metadata import entry_points

    if current is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = current.split(",")
    return ",".join(dict.fromkeys([n for n in names if n] + ["vllm_steer"]))


def cmd_convert(args: argparse.Namespace) -> None:
    from .reference_checkpoint import convert_reference_checkpoint, load_output_embedding

    embedding = load_output_embedding(args.model) if args.model else None
    steer = convert_reference_checkpoint(
        args.checkpoint,
        dim_names=args.dim_names.split(",") if args.dim_names else None,
        output_embedding=embedding,
        base_model=args.model,
    )
    steer.save(args.output)
    h = steer.header
    print(f"wrote {args.output}: dims {list(h.dim_names)} (primary {h.primary_dim}, bias {h.bias_dims}), "
          f"D={h.hidden_size}, r={h.rank}, eps={h.epsilon}, base model {h.base_model}, "
          f"fingerprint {'yes' if h.fingerprint else 'no (pass --model to add one)'}")


def cmd_default_model(args: argparse.Namespace) -> None:
    from .default_model import default_model_dir

    print(default_model_dir())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-steer", description="LM-Steer served by vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start vLLM's OpenAI server with steers loaded; other args go to vLLM",
                       description="Unrecognised arguments are passed on to vLLM's server unchanged.")
    p.add_argument("model")
    p.add_argument("--steer", action="append", default=[], metavar="NAME=PATH",
                   help="load a steer file under NAME; requests use it with vllm_xargs {'steer_NAME': value}")
    p.add_argument("--max-abs-value", type=float, default=SteerConfig.max_abs_value,
                   help="largest |steer value| a request may ask for (default %(default)s)")
    p.add_argument("--steer-bound", action="append", default=[], metavar="NAME=BOUND",
                   help="a bound for one steer, overriding the file's and --max-abs-value")
    p.add_argument("--steer-endpoints", action="store_true", help="serve GET /v1/steers (lists the loaded steers)")
    p.add_argument("--allow-runtime-updates", action="store_true",
                   help="also serve POST /v1/load_steer and /v1/unload_steer (implies --steer-endpoints)")
    p.set_defaults(func=cmd_serve, passthrough=True)

    p = sub.add_parser("convert", help="import a reference LM-Steer checkpoint (.pt) as a steer file")
    p.add_argument("checkpoint", help="the reference's torch.save file; it is unpickled, so trust it")
    p.add_argument("output", help="the .safetensors steer file to write")
    p.add_argument("--model", help="the base model (folder or name) to fingerprint, so loading onto another fails")
    p.add_argument("--dim-names", help="comma-separated names for the K dims (default: steer, bias, dimN)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("default-model", help="print the embedded default model's folder, preparing it if needed")
    p.set_defaults(func=cmd_default_model)

    # Steer tools (train, inspect, keywords, explain, transfer, compose) register here.
    from . import cli_tools

    cli_tools.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "passthrough", False):
            args.func(args, rest)
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        else:
            args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"vllm-steer {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
