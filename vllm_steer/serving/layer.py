"""The steered logits layer: vLLM's `LogitsProcessor` layer, registered out of tree in its place,
steering the post-norm hidden state of the step's sampling rows right before the LM head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer

if TYPE_CHECKING:
    from .worker import WorkerSteering


class SteeredLogitsLayer(VllmLogitsLayer):
    """vLLM's logits layer with the steer applied to the hidden state first. `steering` is handed over when
    the model is attached (serving/worker.py); a layer without it (a draft model's) steers nothing.

    Under LoRA, vLLM calls this forward with its LoRA wrapper as `self` and this layer as the wrapper's
    `base_layer`: the handle is read from the layer either way, and nothing else from `self`."""

    steering: WorkerSteering | None = None

    def forward(
        self,
        lm_head: torch.nn.Module,
        hidden_states: torch.Tensor,
        embedding_bias: torch.Tensor | None = None,
        skip_gather: bool = False,
    ) -> torch.Tensor | None:
        steering = getattr(getattr(self, "base_layer", self), "steering", None)
        if steering is not None:
            hidden_states = steering.steer_sampling_rows(hidden_states)
        return VllmLogitsLayer.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)
