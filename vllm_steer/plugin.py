"""The stable names vLLM loads: `register_plugin` (the `vllm.general_plugins` entry point),
`SteerLogitsProcessor` (for `--logits-processors vllm_steer.plugin:SteerLogitsProcessor`) and
`SteerEndpoints` (the `vllm.endpoint_plugins` entry point).

vLLM imports this module in every process whether or not steers are configured, so it imports no vLLM
internals itself: the two classes are imported when vLLM first asks for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .serving.processor import SteerLogitsProcessor
    from .serving.registry import SteerEndpoints

__all__ = ["SteerEndpoints", "SteerLogitsProcessor", "register_plugin"]


def register_plugin() -> None:
    """The `vllm.general_plugins` entry point, run by vLLM in every process: with steers configured on a
    supported vLLM, install the steered logits layer and the plugin's patches; with none configured,
    nothing (vLLM runs as if the plugin were not installed)."""
    from .serving.vllm_internals import plugin_should_run

    if plugin_should_run():
        from .serving.vllm_patches import install_patches

        install_patches()


def __getattr__(name: str) -> Any:
    if name not in ("SteerLogitsProcessor", "SteerEndpoints"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .serving.vllm_internals import require_supported_vllm

    require_supported_vllm()
    if name == "SteerLogitsProcessor":
        from .serving.processor import SteerLogitsProcessor

        return SteerLogitsProcessor
    from .serving.registry import SteerEndpoints

    return SteerEndpoints
