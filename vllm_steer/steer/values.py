"""Request values: the `steer_<name>` keys of a request's `vllm_xargs` (SamplingParams.extra_args),
checked and turned into each steer's K values (a number sets one dim and keeps the bias dims on)."""

from __future__ import annotations

import math
from typing import Any

from .file import SteerHeader

STEER_KEY_PREFIX = "steer_"


class SteerRequestError(ValueError):
    """A request's steer values are malformed; the server answers HTTP 400 with this text.
    `reason` is a short label for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def steer_args(**values: float | list[float]) -> dict[str, float | list[float]]:
    """The `extra_args` / `vllm_xargs` that steer a request: steer_args(sentiment=3,
    detox=[5, 1]) -> {"steer_sentiment": 3, "steer_detox": [5, 1]}."""
    return {STEER_KEY_PREFIX + name: value for name, value in values.items()}


def has_steer_keys(extra_args: dict[str, Any] | None) -> bool:
    """Whether a request's extra_args asks for any steer (before checking the values)."""
    return bool(extra_args) and any(isinstance(k, str) and k.startswith(STEER_KEY_PREFIX) for k in extra_args)


def steer_values(header: SteerHeader, value: float, dim: str | None = None) -> list[float]:
    """The K values that a single number asks for: `dim` (default: the primary dim) at `value`,
    the bias dims at their fixed values (the reference's dummy dim = 1), every other dim 0."""
    values = [header.bias_dims.get(name, 0.0) for name in header.dim_names]
    values[header.dim_index(dim)] = float(value)
    return values


def _check_number(value: Any, where: str, max_abs_value: float) -> float:
    # bool is an int subclass; a JSON `true` is already 1 by the time it gets here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteerRequestError(f"{where} must be a number, got {type(value).__name__} {value!r}", "not_a_number")
    if not math.isfinite(value):
        raise SteerRequestError(f"{where} must be finite, got {value}", "non_finite")
    if abs(value) > max_abs_value:
        raise SteerRequestError(
            f"{where} = {value} is beyond the allowed range [-{max_abs_value}, {max_abs_value}]", "out_of_range")
    return float(value)


def parse_steer_args(
    extra_args: dict[str, Any] | None,
    catalog: dict[str, SteerHeader],
    max_abs_value: float | dict[str, float],
    max_steers: int | None = None,
) -> dict[str, list[float]]:
    """{steer name: its K values} for the request's `steer_<name>` keys; other keys are
    left to whoever owns them. `max_abs_value` is one bound for all steers or one per steer;
    `max_steers`, if given, the most steers one request may name. Raises SteerRequestError
    naming the problem."""
    request: dict[str, list[float]] = {}
    for key, value in (extra_args or {}).items():
        if not (isinstance(key, str) and key.startswith(STEER_KEY_PREFIX)):
            continue
        name = key[len(STEER_KEY_PREFIX) :]
        header = catalog.get(name)
        if header is None:
            loaded = ", ".join(sorted(catalog)) or "none"
            raise SteerRequestError(
                f"unknown steer {name!r} (vllm_xargs key {key!r}); loaded steers: {loaded}", "unknown_steer")
        bound = max_abs_value[name] if isinstance(max_abs_value, dict) else max_abs_value
        if isinstance(value, list):
            if len(value) != header.num_dims:
                raise SteerRequestError(
                    f"{key} expects a number or a list of {header.num_dims} numbers "
                    f"({', '.join(header.dim_names)}), got a list of {len(value)}", "wrong_length")
            value = [_check_number(v, f"{key}[{i}]", bound) for i, v in enumerate(value)]
        else:
            if isinstance(value, str):
                raise SteerRequestError(
                    f"{key} must be a number or a list of numbers, got the string {value!r}", "not_a_number")
            value = steer_values(header, _check_number(value, key, bound))
        request[name] = value
    if max_steers is not None and len(request) > max_steers:
        raise SteerRequestError(f"the request names {len(request)} steers ({', '.join(request)}); this server "
                                f"composes at most {max_steers} in one request", "too_many_steers")
    return request
