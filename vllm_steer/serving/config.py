"""The served configuration: which steers a server loads and how far requests may push them,
carried in one environment variable so that every vLLM process sees the same set (the API front
end, which validates requests before any worker sees them, the engine core and its workers).
No vLLM import."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vllm_steer.steer.file import SteerHeader, read_header

ENV_VAR = "VLLM_STEER_CONFIG"
# Opt-in for POST /v1/load_steer and /v1/unload_steer, as vLLM gates runtime LoRA updates.
RUNTIME_UPDATES_ENV = "VLLM_STEER_ALLOW_RUNTIME_UPDATES"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
DEFAULT_MAX_ABS_VALUE = 50.0


@dataclass(frozen=True)
class SteerConfig:
    """steers: name -> steer file path; max_abs_value: the largest |value| a request may ask
    for; bounds: the operator's tighter or looser bound for particular steers."""

    steers: dict[str, str] = field(default_factory=dict)
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE
    bounds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steers", {n: str(Path(p).resolve()) for n, p in self.steers.items()})
        for name in self.steers:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"steer name {name!r} must be letters, digits and underscores")
        for name, bound in {"max_abs_value": self.max_abs_value, **self.bounds}.items():
            if not (isinstance(bound, (int, float)) and 0 < bound < float("inf")):
                raise ValueError(f"the bound for {name} must be a positive finite number, got {bound}")
        unknown = set(self.bounds) - set(self.steers)
        if unknown:
            raise ValueError(f"bounds given for steers that are not loaded: {sorted(unknown)}")

    @cached_property
    def value_bounds(self) -> dict[str, float]:
        """Each steer's bound: the operator's if given, else the file's, else max_abs_value."""
        return {name: self.bounds.get(name) or header.max_abs_value or self.max_abs_value
                for name, header in self.catalog.items()}

    def with_steer(self, name: str, path: str, bound: float | None = None) -> SteerConfig:
        if name in self.steers:
            raise ValueError(f"a steer named {name!r} is already loaded")
        bounds = {**self.bounds, **({name: bound} if bound is not None else {})}
        return SteerConfig({**self.steers, name: path}, self.max_abs_value, bounds)

    def without_steer(self, name: str) -> SteerConfig:
        if name not in self.steers:
            raise KeyError(name)
        return SteerConfig({n: p for n, p in self.steers.items() if n != name}, self.max_abs_value,
                           {n: b for n, b in self.bounds.items() if n != name})

    def to_json(self) -> str:
        return json.dumps({"steers": self.steers, "max_abs_value": self.max_abs_value, "bounds": self.bounds})

    @classmethod
    def from_json(cls, text: str) -> SteerConfig:
        try:
            data = json.loads(text)
            return cls(steers=dict(data.get("steers", {})),
                       max_abs_value=float(data.get("max_abs_value", DEFAULT_MAX_ABS_VALUE)),
                       bounds={n: float(b) for n, b in data.get("bounds", {}).items()})
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{ENV_VAR} is not valid steer configuration JSON: {e}") from e

    @classmethod
    def from_env(cls) -> SteerConfig | None:
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else None

    def export(self) -> None:
        """Put this configuration where every vLLM process started from here will read it."""
        os.environ[ENV_VAR] = self.to_json()

    @cached_property
    def catalog(self) -> dict[str, SteerHeader]:
        """Each steer's header (metadata only): what request validation needs."""
        return {name: read_header(path) for name, path in self.steers.items()}


def served_config() -> SteerConfig:
    """The steers this process serves: set by a runtime load or unload, else read once from
    VLLM_STEER_CONFIG."""
    global _SERVED
    if _SERVED is None:
        config = SteerConfig.from_env()
        if config is None or not config.steers:
            raise RuntimeError(f"no steers configured: set {ENV_VAR} (vllm-steer serve does) "
                               "or use vllm_steer.steered_llm")
        _SERVED = config
    return _SERVED


def set_served_config(config: SteerConfig) -> None:
    """Serve `config` from now on in this process (the runtime registry's front-end half)."""
    global _SERVED
    _SERVED = config


def runtime_updates_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATES_ENV, "").lower() in ("1", "true")


_SERVED: SteerConfig | None = None
