"""The offline `vllm.LLM` helper: the same per-request steering as the server, in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DEFAULT_MAX_ABS_VALUE, SteerConfig


def steered_llm(model: str, steers: dict[str, str | Path], max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
                **llm_kwargs: Any):
    """A `vllm.LLM` with `steers` (name -> steer file) loaded. Steer each request with
    `SamplingParams(extra_args=steer_args(name=value))`.

    The steer set travels to vLLM's engine processes through the VLLM_STEER_CONFIG
    environment variable, which this sets in the current process."""
    from vllm import LLM

    from .vllm_internals import require_supported_vllm

    require_supported_vllm()  # before anything is set up: an unsupported vLLM is refused, naming the versions
    from .processor import SteerLogitsProcessor

    SteerConfig(steers={n: str(p) for n, p in steers.items()}, max_abs_value=max_abs_value).export()
    processors = [*llm_kwargs.pop("logits_processors", []), SteerLogitsProcessor]
    return LLM(model=model, logits_processors=processors, **llm_kwargs)
