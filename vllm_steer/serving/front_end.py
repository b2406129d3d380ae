"""The API front end's steer set: what requests are checked against in `validate_params`, read once from
VLLM_STEER_CONFIG (each steer's header read from its file) and replaced by the runtime registry once every
worker serves the new set. One per front-end process (several API servers each hold their own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_steer.steer.file import SteerHeader
from vllm_steer.steer.values import STEER_KEY_PREFIX, SteerRequestError, parse_steer_args

from .config import ENV_VAR, SteerConfig


@dataclass(frozen=True)
class AdmittedSteers:
    """The steer set a front end admits requests for: `config` (its headers read), each steer's value bound
    (computed once, not per request)."""

    config: SteerConfig
    bounds: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", self.config.value_bounds)

    @property
    def catalog(self) -> dict[str, SteerHeader]:
        return self.config.catalog

    def parse(self, extra_args: dict | None) -> dict[str, list[float]]:
        """A request's steers as {name: its K values}; SteerRequestError naming the problem otherwise."""
        return parse_steer_args(extra_args, self.catalog, self.bounds, self.config.max_steers_per_request)

    def preset_xargs(self, name: str, values: dict[str, float | list[float]] | None = None) -> dict:
        """The vllm_xargs the preset `name` stands for (its own values, or `values` for one being added),
        checked like any request's: SteerRequestError naming the preset and the problem otherwise (a steer
        that is not loaded: the preset is refused, never served unsteered)."""
        values = self.config.presets[name] if values is None else values
        xargs = {STEER_KEY_PREFIX + steer: value for steer, value in values.items()}
        try:
            self.parse(xargs)
        except SteerRequestError as e:
            raise SteerRequestError(f"preset {name!r}: {e}", f"preset_{e.reason}") from e
        return xargs


_admitted: AdmittedSteers | None = None


def admitted() -> AdmittedSteers:
    """The steers this front end admits requests for: set by the runtime registry, else read once from
    VLLM_STEER_CONFIG."""
    global _admitted
    if _admitted is None:
        config = SteerConfig.from_env()
        if config is None or not config.steers:
            raise RuntimeError(f"no steers configured: set {ENV_VAR} (vllm-steer serve does) "
                               "or use vllm_steer.steered_llm")
        _admitted = AdmittedSteers(config.with_headers())
    return _admitted


def admit(config: SteerConfig) -> AdmittedSteers:
    """Admit requests for `config` (its headers read) from now on; what the runtime registry calls."""
    global _admitted
    _admitted = AdmittedSteers(config)
    return _admitted

