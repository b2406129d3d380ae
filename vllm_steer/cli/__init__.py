"""`vllm-steer`: the command line, thin over the library. Each subcommand lives in `serve` (serving)
or `steer_tools` (making and studying steers) as a pair: `add_<command>` registers its arguments,
`run_<command>` parses them and calls one library function."""

from __future__ import annotations

import argparse
import sys

from . import serve, steer_tools

COMMANDS = [*serve.COMMANDS, *steer_tools.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-steer", description="LM-Steer served by vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
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
