"""Which steers a server has loaded, carried in one environment variable so that every vLLM
process sees the same set: the API front end (which validates requests before any worker
sees them) as well as the engine core and its workers. No vLLM."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .steer_bank import SteerBank
from .steer_file import SteerFile, SteerHeader, read_header

ENV_VAR = "VLLM_STEER_CONFIG"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
DEFAULT_MAX_ABS_VALUE = 50.0


@dataclass(frozen=True)
class SteerConfig:
    """steers: name -> steer file path; max_abs_value: the largest |value| a request may ask for."""

    steers: dict[str, str] = field(default_factory=dict)
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE

    def __post_init__(self) -> None:
        for name in self.steers:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"steer name {name!r} must be letters, digits and underscores")
        if not self.max_abs_value > 0:
            raise ValueError(f"max_abs_value must be positive, got {self.max_abs_value}")

    @classmethod
    def from_specs(cls, specs: list[str], **kwargs: float) -> SteerConfig:
        """From NAME=PATH strings, as `vllm-steer serve --steer` takes them."""
        steers: dict[str, str] = {}
        for spec in specs:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--steer expects NAME=PATH, got {spec!r}")
            if name in steers:
                raise ValueError(f"steer {name!r} given twice")
            steers[name] = str(Path(path).resolve())
        return cls(steers=steers, **kwargs)

    def to_json(self) -> str:
        return json.dumps({"steers": self.steers, "max_abs_value": self.max_abs_value})

    @classmethod
    def from_json(cls, text: str) -> SteerConfig:
        try:
            data = json.loads(text)
            return cls(steers=dict(data.get("steers", {})),
                       max_abs_value=float(data.get("max_abs_value", DEFAULT_MAX_ABS_VALUE)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{ENV_VAR} is not valid steer configuration JSON: {e}") from None

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

    def load_steers(self) -> dict[str, SteerFile]:
        return {name: SteerFile.load(path) for name, path in self.steers.items()}

    def load_bank(self) -> SteerBank:
        return SteerBank(self.load_steers())
