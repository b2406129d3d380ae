"""Argument forms the subcommands share: NAME=VALUE pairs (`--steer`, `--steer-bound`, `--scale`,
`compose`'s `[NAME=]FILE`), a folder of steer files (`--steer-dir`) and sizes in bytes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
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


def steers_in_folder(folder: str | Path) -> dict[str, str]:
    """{file stem: path} for every .safetensors file in `folder` (not its subfolders), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--steer-dir {folder}: not a folder")
    found = {p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))}
    if not found:
        raise ValueError(f"--steer-dir {folder}: no .safetensors files there")
    return found


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """Bytes from '1073741824', '512M', '2G', '1.5GiB' (binary units, case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"expected a size such as 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
