"""The stable names vLLM loads: the `vllm.general_plugins` and `vllm.endpoint_plugins` entry points,
and the state processor for `--logits-processors vllm_steer.plugin:SteerLogitsProcessor`."""

from .serving.compat import register_plugin
from .serving.processor import SteerLogitsProcessor
from .serving.registry import SteerEndpoints

__all__ = ["SteerEndpoints", "SteerLogitsProcessor", "register_plugin"]
