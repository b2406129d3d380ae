"""`vllm-steer compose`: combine steers into one file of K_A + K_B + ... dims.

Applying steers A and B together adds their deltas: h + eps_A sum_a s_a W_a + eps_B sum_b s_b W_b.
One file has one eps and one rank, so each source's eps (relative to the first source's) and any
scale factor are folded into its P2, and smaller ranks are padded with zero columns. Both are
exact: a zero column of P1/P2 adds nothing to P1 P2^T."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_steer.steer.file import SteerFile


def pad_rank(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """[K, D, r] -> [K, D, rank] with zero columns appended."""
    return torch.nn.functional.pad(tensor, (0, rank - tensor.shape[2]))


def compose_steers(sources: dict[str, str | Path | SteerFile], scales: dict[str, float] | None = None,
                   primary: str | None = None) -> SteerFile:
    """One steer holding every source's dims, named SOURCE_DIM. `scales` maps a source name
    (its whole effect, bias dims included) or a composed dim name to a factor folded into P2.
    Each source's bias dims stay bias dims at their values; the primary dim defaults to the first
    source's primary."""
    scales = dict(scales or {})
    steers = {name: s if isinstance(s, SteerFile) else SteerFile.load(s) for name, s in sources.items()}
    if not steers:
        raise ValueError("nothing to compose")
    hidden = {s.header.hidden_size for s in steers.values()}
    if len(hidden) != 1:
        raise ValueError(f"steers for different hidden sizes cannot be composed: {sorted(hidden)}")
    fingerprints = {repr(s.header.fingerprint) for s in steers.values() if s.header.fingerprint is not None}
    if len(fingerprints) > 1:
        raise ValueError("the steers were made for different models (their embedding fingerprints differ)")
    first = next(iter(steers.values()))
    epsilon = first.header.epsilon
    rank = max(s.header.rank for s in steers.values())
    names, bias_dims, p1s, p2s, parts = [], {}, [], [], []
    for source, steer in steers.items():
        h = steer.header
        p1 = pad_rank(steer.projector1.float(), rank)
        p2 = pad_rank(steer.projector2.float(), rank) * (h.epsilon / epsilon) * scales.pop(source, 1.0)
        for k, dim in enumerate(h.dim_names):
            name = f"{source}_{dim}"
            p2[k] = p2[k] * scales.pop(name, 1.0)
            names.append(name)
            if dim in h.bias_dims:
                bias_dims[name] = h.bias_dims[dim]
        p1s.append(p1)
        p2s.append(p2)
        parts.append({"name": source, "dims": list(h.dim_names), "epsilon": h.epsilon, "rank": h.rank,
                      "source": h.source, "base_model": h.base_model})
    if scales:
        raise ValueError(f"--scale names match no source or dim: {sorted(scales)} (dims: {names})")
    primary_dim = primary or f"{next(iter(steers))}_{first.header.primary_dim}"
    base_models = {s.header.base_model for s in steers.values()}
    return SteerFile.create(
        torch.cat(p1s), torch.cat(p2s), dim_names=names, epsilon=epsilon, primary_dim=primary_dim,
        bias_dims=bias_dims, base_model=base_models.pop() if len(base_models) == 1 else None,
        fingerprint=first.header.fingerprint, recipe={"composed_from": parts},
        source="composed with vllm-steer compose from " + ", ".join(steers),
    )
