"""Subcommands for making and studying steers: train, inspect, keywords, explain, transfer,
compose. Each is a thin wrapper over a library function."""

from __future__ import annotations

import argparse


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the steer-tool subcommands on the `vllm-steer` parser."""
