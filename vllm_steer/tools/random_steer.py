"""Random steers for tests, demos and benchmarks: Gaussian projectors of a chosen shape, optionally
fingerprinted for a model's output embedding so that a server accepts them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import embedding_fingerprint


def random_steer(dim_names: Sequence[str], hidden_size: int, rank: int, *, seed: int = 0, sigma: float = 1.0,
                 epsilon: float = 1e-3, embedding: torch.Tensor | None = None, **header_fields: Any) -> SteerFile:
    """A steer whose P1 and P2 ([K, D, r]) are drawn, in that order, from N(0, sigma^2) with a
    generator seeded `seed`; fingerprinted for `embedding` ([V, D]) if given. Other header fields
    (bias_dims, base_model, max_abs_value, ...) pass through to `SteerFile.create`."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(dim_names), hidden_size, rank)
    p1, p2 = (torch.randn(shape, generator=g) * sigma for _ in range(2))
    if embedding is not None:
        header_fields["fingerprint"] = embedding_fingerprint(embedding)
    return SteerFile.create(p1, p2, dim_names=list(dim_names), epsilon=epsilon, **header_fields)
