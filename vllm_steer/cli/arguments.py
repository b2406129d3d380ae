"""Argument forms the subcommands share: NAME=VALUE pairs (`--steer`, `--steer-bound`, `--scale`,
`compose`'s `[NAME=]FILE`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def name_value_pairs(specs: list[str], flag: str, form: str, convert: Callable[[str], T] = str) -> dict[str, T]:
    """{NAME: convert(VALUE)} from NAME=VALUE strings; a ValueError names the flag, the form and the
    offending string, also when a name is given twice."""
    pairs: dict[str, T] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects {form}, got {spec!r}")
        if name in pairs:
            raise ValueError(f"{flag}: {name!r} given twice")
        try:
            pairs[name] = convert(value)
        except ValueError as e:
            raise ValueError(f"{flag} expects {form}, got {spec!r} ({e})") from e
    return pairs
