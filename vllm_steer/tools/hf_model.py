"""Hugging Face model loading for the steer tools: a frozen transformers causal LM (from a folder,
a hub-style name or a .gguf file), its output head, and the post-norm hidden state that feeds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def model_location(model: str | Path) -> tuple[str, dict[str, Any]]:
    """from_pretrained's location and arguments: a folder or hub-style name, or a .gguf file
    (read by transformers' GGUF loader, dequantized)."""
    path = Path(model)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(model), {}


def load_frozen_model(model: str | Path, device: str | torch.device = "cpu"):
    """A transformers causal LM and its tokenizer, in float32, eval mode, no gradients; refuses
    models whose logits the steer tools would compute wrongly (final logit soft-capping)."""
    from transformers import AutoTokenizer

    lm = _frozen_lm(model, device)
    if getattr(lm.config, "final_logit_softcapping", None):
        raise ValueError(f"{model}: models with final logit soft-capping are not supported")
    location, kwargs = model_location(model)
    return lm, AutoTokenizer.from_pretrained(location, **kwargs)


def output_head(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E [V, D] and the head's bias (GPT-J has one; dropping it, as the reference does, is wrong)."""
    head = lm.get_output_embeddings()
    return head.weight.detach(), (head.bias.detach() if getattr(head, "bias", None) is not None else None)


def final_hidden_states(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h: the post-norm final hidden state that feeds the LM head, [B, T, D]."""
    return lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_output_embedding(model: str | Path) -> torch.Tensor:
    """The output embedding E [V, D] of a transformers model (folder, name or .gguf file), float32."""
    return output_head(_frozen_lm(model))[0].float()


def load_output_head(model: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E [V, D] and the LM head's bias (None when it has none) of a transformers model, float32."""
    weight, bias = output_head(_frozen_lm(model))
    return weight.float(), None if bias is None else bias.float()


def _frozen_lm(model: str | Path, device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    location, kwargs = model_location(model)
    lm = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs).to(device).eval()
    lm.requires_grad_(False)
    return lm
