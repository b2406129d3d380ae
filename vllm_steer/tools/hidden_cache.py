"""The hidden-state cache that makes training fast: the frozen model's final hidden states at every
position that predicts a next token, computed once per text (the steer does not change them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hf_model import final_hidden_states

CACHE_FORMAT = "vllm-steer-hidden-cache/1"




@dataclass
class HiddenStateCache:
    """Every example's final hidden states at the positions that predict a next token,
    concatenated: hidden [N, D], targets [N], offsets [n_examples + 1]; labels [n, K]."""

    hidden: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    def positions(self, example_ids: torch.Tensor) -> torch.Tensor:
        starts, ends = self.offsets[example_ids], self.offsets[example_ids + 1]
        return torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends, strict=True)])

    def batch(self, example_ids: torch.Tensor, training_vectors: torch.Tensor, device: torch.device | str):
        """(h, per-position steer values, targets) of the given examples."""
        pos = self.positions(example_ids)
        lengths = (self.offsets[example_ids + 1] - self.offsets[example_ids]).tolist()
        values = torch.repeat_interleave(training_vectors[example_ids], torch.tensor(lengths), dim=0)
        return self.hidden[pos].to(device), values.to(device), self.targets[pos].to(device)

    def save(self, path: str | Path, key: str) -> None:
        from safetensors.torch import save_file

        tensors = {"hidden": self.hidden, "targets": self.targets, "offsets": self.offsets, "labels": self.labels}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"format": CACHE_FORMAT, "key": key})

    @classmethod
    def load(cls, path: str | Path, key: str) -> HiddenStateCache | None:
        """The cache at `path` if it was made from the same model, texts and settings."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                    return None
                return cls(**{k: f.get_tensor(k) for k in ("hidden", "targets", "offsets", "labels")})
        except (OSError, ValueError, RuntimeError):
            return None


@torch.no_grad()
def build_cache(lm, token_ids: Sequence[Sequence[int]], labels: torch.Tensor, device: torch.device | str = "cpu",
                tokens_per_batch: int = 4096, progress: bool = False) -> HiddenStateCache:
    """Run the frozen model once over every example (length-sorted, right-padded batches; the
    causal mask keeps real positions blind to the padding) and keep h at real positions."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    per_example: list[torch.Tensor | None] = [None] * len(token_ids)
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(token_ids[i]) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="hidden states", unit="batch")
    for batch in iterator:
        width = max(len(token_ids[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[row, : len(token_ids[i])] = 1
        h = final_hidden_states(lm, ids.to(device), mask.to(device)).float().cpu()
        for row, i in enumerate(batch):
            per_example[i] = h[row, : len(token_ids[i]) - 1]
    lengths = torch.tensor([len(t) - 1 for t in token_ids])
    offsets = torch.zeros(len(token_ids) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    targets = torch.cat([torch.tensor(t[1:], dtype=torch.long) for t in token_ids])
    return HiddenStateCache(torch.cat(per_example), targets, offsets, labels.float())


def cache_key(fingerprint: dict[str, Any], token_ids: Sequence[Sequence[int]], labels: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for ids in token_ids:
        digest.update(json.dumps(ids).encode())
    digest.update(labels.float().numpy().tobytes())
    return digest.hexdigest()
