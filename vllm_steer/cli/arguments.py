"""Argument forms the subcommands share: NAME=VALUE pairs (`--steer`, `--steer-bound`, `--scale`,
`compose`'s `[NAME=]FILE`), a folder of steer files (`--steer-dir`) and sizes in bytes."""

from __future__ import annotations

import json
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


def preset_specs(specs: list[str]) -> dict[str, dict[str, float | list[float]]]:
    """{preset: {steer: value}} from `--steer-preset NAME=STEER:VALUE[,STEER:VALUE...]` strings, where a VALUE is a
    number or a list of K numbers as in vllm_xargs (`detox:[5,1]`); a ValueError names the flag and the string."""
    presets: dict[str, dict[str, float | list[float]]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--steer-preset expects NAME=STEER:VALUE[,STEER:VALUE...], got {spec!r}")
        if name in presets:
            raise ValueError(f"--steer-preset: {name!r} given twice")
        values: dict[str, float | list[float]] = {}
        for part in re.split(r",(?![^\[]*\])", rest):  # commas outside brackets
            steer, sep, value = part.partition(":")
            if not sep or not steer:
                raise ValueError(f"--steer-preset {spec!r}: each steer needs STEER:VALUE")
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, bool) or not (isinstance(parsed, (int, float)) or (
                    isinstance(parsed, list) and all(isinstance(v, (int, float)) for v in parsed))):
                raise ValueError(f"--steer-preset {spec!r}: {value!r} is not a number or a list of numbers")
            if steer.strip() in values:
                raise ValueError(f"--steer-preset {spec!r}: steer {steer.strip()!r} given twice")
            values[steer.strip()] = parsed
        presets[name] = values
    return presets


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
