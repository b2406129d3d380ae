"""The embedding fingerprint: a small summary of a model's output embedding stored in a steer
file, so that loading a steer onto a model it was not made for fails with a clear error."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .file import SteerFileError, SteerHeader

# Rows of the output embedding sampled for the fingerprint; spread over the vocabulary.
FINGERPRINT_ROWS = 16
# bf16 rounding of an fp32 embedding moves a row norm by well under 1%; another model's
# embedding differs by tens of percent.
FINGERPRINT_RTOL = 2e-2
# The refusals' checks, as a server tells a client about a steer the workers refused.
HIDDEN_SIZE_MISMATCH = "its hidden size is not the model's"
FINGERPRINT_MISMATCH = "it does not fit this model's output embedding (its embedding fingerprint differs)"


def fingerprint_rows(vocab_size: int) -> list[int]:
    """The embedding rows a fingerprint samples: FINGERPRINT_ROWS spread evenly over the vocabulary."""
    return sorted({round(i * (vocab_size - 1) / (FINGERPRINT_ROWS - 1)) for i in range(FINGERPRINT_ROWS)})


def embedding_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """A small, dtype-tolerant summary of an output embedding [V, D]: the norm and the sum
    of a few rows spread over the vocabulary."""
    rows = fingerprint_rows(weight.shape[0])
    sample = weight[rows].double()
    return {
        "vocab_size": int(weight.shape[0]),
        "hidden_size": int(weight.shape[1]),
        "rows": rows,
        "norms": [round(x, 6) for x in sample.norm(dim=1).tolist()],
        "sums": [round(x, 6) for x in sample.sum(dim=1).tolist()],
    }


def fingerprint_mismatch(
    fingerprint: dict[str, Any], weight_shard: torch.Tensor, first_row: int = 0, vocab_size: int | None = None
) -> str | None:
    """Why `weight_shard` (rows first_row.. of the model's output embedding, as a tensor-
    parallel rank holds it) is not the embedding the fingerprint was taken of; None if it is."""
    if weight_shard.shape[1] != fingerprint["hidden_size"]:
        return f"hidden size {weight_shard.shape[1]} != {fingerprint['hidden_size']}"
    if vocab_size is not None and vocab_size != fingerprint["vocab_size"]:
        return f"vocabulary size {vocab_size} != {fingerprint['vocab_size']}"
    for row, norm, total in zip(fingerprint["rows"], fingerprint["norms"], fingerprint["sums"], strict=True):
        local = row - first_row
        if not 0 <= local < weight_shard.shape[0]:
            continue
        vec = weight_shard[local].double()
        scale = max(abs(norm), 1e-6)
        if abs(vec.norm().item() - norm) > FINGERPRINT_RTOL * scale:
            return f"row {row} norm {vec.norm().item():.6g} != {norm:.6g}"
        # A row sum can be near zero; compare it on the scale of the row's norm.
        if abs(vec.sum().item() - total) > FINGERPRINT_RTOL * scale * math.sqrt(len(vec)):
            return f"row {row} sum {vec.sum().item():.6g} != {total:.6g}"
    return None


def check_fits_model(header: SteerHeader, hidden_size: int, where: str) -> None:
    """Refuse a steer made for another hidden size; warn when it has no fingerprint to check."""
    if header.hidden_size != hidden_size:
        raise SteerFileError(
            f"{where}: steer hidden size D={header.hidden_size} does not match the model's {hidden_size}"
            + (f" (the steer was made for {header.base_model})" if header.base_model else ""),
            HIDDEN_SIZE_MISMATCH)
    if header.fingerprint is None:
        warnings.warn(
            f"{where}: the steer file has no embedding fingerprint, so it cannot be checked against "
            "the model; add one with `vllm-steer convert --model`",
            stacklevel=2,
        )
