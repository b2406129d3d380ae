"""The steered logits layer: vLLM's `LogitsProcessor` layer, registered out of tree in its place,
steering the post-norm hidden state of every row right before the LM head."""

from __future__ import annotations

import torch
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer

from .step import STEP


class SteeredLogitsLayer(VllmLogitsLayer):
    """vLLM's logits layer with the steer applied to the hidden state first.

    Reads nothing from `self`: under LoRA, vLLM calls this forward with its LoRA wrapper as
    `self`."""

    def forward(
        self,
        lm_head: torch.nn.Module,
        hidden_states: torch.Tensor,
        embedding_bias: torch.Tensor | None = None,
        skip_gather: bool = False,
    ) -> torch.Tensor | None:
        if STEP.table is not None:
            hidden_states = STEP.take(hidden_states)
        return VllmLogitsLayer.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)
