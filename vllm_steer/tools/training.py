"""Train an LM-Steer on labelled text, the fast way.

The steer acts only between the model's final hidden state h and its LM head, so h does not
depend on the steer: the frozen transformer runs once per text (no gradient) and its hidden
states are cached. Each training step then costs only the steer, the LM head and the
cross-entropy over the cached positions. The reference recipe (Han et al., 2024) is the default:
rank min(1000, D), eps 1e-3, init randn * 0.01, Adam lr 1e-2, 1000 steps, batch 32, max length
256, seed 0, training vector [label, 1]. Padding never enters the loss (the reference counts it).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import embedding_fingerprint
from vllm_steer.steer.formula import steered_hidden

from .hf_model import load_frozen_model, output_head
from .hidden_cache import HiddenStateCache, build_cache, cache_key
from .training_data import LabelledText, data_provenance

REFERENCE_RANK_CAP = 1000
CE_CHUNK = 1024  # positions per LM-head chunk: bounds the [chunk, V] logits held at once


@dataclass
class TrainConfig:
    """Everything that decides the trained steer; stored as the steer file's recipe."""

    dim_names: list[str] = field(default_factory=lambda: ["steer"])
    bias_dim: str | None = "bias"  # a dim held at bias_value for every example (the reference's dummy steer)
    bias_value: float = 1.0
    rank: int | None = None  # None: min(1000, D)
    epsilon: float = 1e-3
    init_std: float = 0.01
    lr: float = 1e-2
    steps: int = 1000
    batch_size: int = 32
    max_length: int = 256
    seed: int = 0
    l2: float = 0.0  # l2 * (|P1|^2 + |P2|^2), summed over all entries
    head_dtype: str = "float32"  # dtype of the LM-head matmuls in training (float32 or bfloat16)
    # After training, the trained dims' P2 is multiplied by this: value v of the file then steers as
    # v * value_scale of the trained steer (calibrates where the recommended value lands; bias dims untouched).
    value_scale: float = 1.0

    @property
    def all_dims(self) -> list[str]:
        return [*self.dim_names, *([self.bias_dim] if self.bias_dim else [])]

    def resolved_rank(self, hidden_size: int) -> int:
        return self.rank if self.rank is not None else min(REFERENCE_RANK_CAP, hidden_size)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Sum over positions of CE(h' @ E^T + b, y), with d/dh' computed in the same pass, chunk
    by chunk, so the [N, V] logits never exist at once and E (frozen) gets no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype):  # noqa: D102
        total = hidden.new_zeros(())
        grad = torch.empty_like(hidden)
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], CE_CHUNK):
            hc = hidden[start:start + CE_CHUNK]
            yc = targets[start:start + CE_CHUNK]
            logits = (hc.to(dtype) @ w.T).float()
            if bias is not None:
                logits = logits + bias
            logp = torch.log_softmax(logits, dim=-1)
            total = total - logp.gather(1, yc[:, None]).sum()
            probs = logp.exp_()
            probs[torch.arange(len(yc), device=probs.device), yc] -= 1.0
            grad[start:start + CE_CHUNK] = (probs.to(dtype) @ w).float()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean cross-entropy of the LM head over the given positions."""
    return ChunkedHeadCrossEntropy.apply(hidden, weight, bias, targets, dtype) / max(len(targets), 1)


def batch_order(num_examples: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The example ids of a step: epochs of seeded shuffles, so any step's batch is known
    without replaying earlier steps (what makes resuming exact)."""
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[index * batch_size:(index + 1) * batch_size]


def initial_projectors(config: TrainConfig, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(config.seed)
    shape = (len(config.all_dims), hidden_size, config.resolved_rank(hidden_size))
    return torch.randn(shape, generator=g) * config.init_std, torch.randn(shape, generator=g) * config.init_std


def training_vectors(config: TrainConfig, labels: torch.Tensor) -> torch.Tensor:
    """Each example's steer values while training: its labels, then the bias dim at bias_value."""
    if config.bias_dim:
        return torch.cat([labels, torch.full((len(labels), 1), config.bias_value)], dim=1)
    return labels


def regularisation(config: TrainConfig, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    return config.l2 * (p1.pow(2).sum() + p2.pow(2).sum())


def cached_step_loss(config: TrainConfig, cache: HiddenStateCache, vectors: torch.Tensor, ids: torch.Tensor,
                     p1: torch.Tensor, p2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     device: torch.device | str) -> torch.Tensor:
    h, values, targets = cache.batch(ids, vectors, device)
    steered = steered_hidden(h, values, p1, p2, config.epsilon)
    loss = head_loss(steered, weight, bias, targets, getattr(torch, config.head_dtype))
    return loss + regularisation(config, p1, p2)


@dataclass
class TrainResult:
    projector1: torch.Tensor
    projector2: torch.Tensor
    losses: list[float]
    seconds: dict[str, float]


def save_checkpoint(path: str | Path, step: int, p1: torch.Tensor, p2: torch.Tensor, optimizer: torch.optim.Optimizer,
                    identity: str, losses: list[float]) -> None:
    """Optimizer state and step beside the output, written atomically; loads with weights_only."""
    tmp = Path(str(path) + ".partial")
    torch.save({"step": step, "projector1": p1.detach().cpu(), "projector2": p2.detach().cpu(),
                "optimizer": optimizer.state_dict(), "identity": identity, "losses": losses}, tmp)
    tmp.replace(path)


def train_on_cache(config: TrainConfig, cache: HiddenStateCache, weight: torch.Tensor, bias: torch.Tensor | None,
                   device: torch.device | str = "cpu", checkpoint: str | Path | None = None,
                   checkpoint_every: int = 100, resume: bool = False, progress: bool = False,
                   stop_after: int | None = None) -> TrainResult:
    """Adam on P1, P2 over the cached hidden states. With `checkpoint`, the state is saved every
    `checkpoint_every` steps and at the end; `resume` continues from it (same config and data
    required). `stop_after` ends early at that step (to test resuming)."""
    torch.manual_seed(config.seed)
    p1_init, p2_init = initial_projectors(config, weight.shape[1])
    p1 = p1_init.to(device).requires_grad_(True)
    p2 = p2_init.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([p1, p2], lr=config.lr)
    vectors = training_vectors(config, cache.labels)
    identity = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()
                              + cache.targets.numpy().tobytes() + vectors.numpy().tobytes()).hexdigest()
    start, losses = 0, []
    if resume and checkpoint and Path(checkpoint).is_file():
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        if state["identity"] != identity:
            raise ValueError(f"{checkpoint}: made with another recipe or other data; delete it or drop --resume")
        with torch.no_grad():
            p1.copy_(state["projector1"])
            p2.copy_(state["projector2"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
    weight = weight.to(device)
    bias = bias.to(device) if bias is not None else None
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    steps: Iterator[int] = iter(range(start, end))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step")
        steps = iter(bar)
    began = time.perf_counter()
    for step in steps:
        ids = batch_order(cache.num_examples, config.batch_size, config.seed, step)
        loss = cached_step_loss(config, cache, vectors, ids, p1, p2, weight, bias, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
            save_checkpoint(checkpoint, step + 1, p1, p2, optimizer, identity, losses)
    return TrainResult(p1.detach().cpu(), p2.detach().cpu(), losses, {"train": time.perf_counter() - began})


def prepare_examples(config: TrainConfig, tokenizer, examples: Sequence[LabelledText]):
    """Token ids and labels of the examples that have at least one next-token target."""
    ids = tokenize(tokenizer, [e.text for e in examples], config.max_length)
    keep = [i for i, t in enumerate(ids) if len(t) >= 2]
    labels = torch.tensor([examples[i].labels for i in keep], dtype=torch.float32).reshape(len(keep), -1)
    if labels.shape[1] != len(config.dim_names):
        raise ValueError(f"examples carry {labels.shape[1]} labels, but {len(config.dim_names)} dims are trained")
    return [ids[i] for i in keep], labels


def train_steer(config: TrainConfig, model: str | Path, examples: Sequence[LabelledText], *,
                data_files: Sequence[str | Path] = (), device: str = "cpu", base_model: str | None = None,
                cache_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                checkpoint_every: int = 100, resume: bool = False, progress: bool = True,
                max_abs_value: float | None = None) -> tuple[SteerFile, TrainResult]:
    """Train a steer for `model` on `examples` and return it as a complete SteerFile: recipe,
    data provenance and the model's embedding fingerprint in its metadata."""
    if not examples:
        raise ValueError("no training examples")
    timings = {}
    began = time.perf_counter()
    lm, tokenizer = load_frozen_model(model, device)
    weight, bias = output_head(lm)
    fingerprint = embedding_fingerprint(weight.cpu())
    token_ids, labels = prepare_examples(config, tokenizer, examples)
    timings["load"] = time.perf_counter() - began
    began = time.perf_counter()
    cache = None
    key = cache_key(fingerprint, token_ids, labels)
    cache_path = Path(cache_dir) / f"hidden-{key[:24]}.safetensors" if cache_dir else None
    if cache_path is not None and cache_path.is_file():
        cache = HiddenStateCache.load(cache_path, key)
    if cache is None:
        cache = build_cache(lm, token_ids, labels, device, progress=progress)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache.save(cache_path, key)
    timings["hidden_states"] = time.perf_counter() - began
    del lm
    result = train_on_cache(config, cache, weight, bias, device, checkpoint=checkpoint,
                            checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    timings.update(result.seconds)
    result.seconds = timings
    projector2 = result.projector2.clone()
    projector2[: len(config.dim_names)] *= config.value_scale
    recipe = {
        **asdict(config),
        "rank": config.resolved_rank(weight.shape[1]),
        "training_vector": "[labels..., bias_value]" if config.bias_dim else "[labels...]",
        "loss": "mean token cross-entropy over real (unpadded) positions" + (" + l2 * (|P1|^2 + |P2|^2)"
                                                                             if config.l2 else ""),
        "optimizer": "Adam",
        "trainer": "vllm-steer train (cached final hidden states)",
        "data": {**data_provenance(data_files, examples), "used_examples": cache.num_examples,
                 "target_tokens": int(cache.targets.numel())},
        "final_loss": round(sum(result.losses[-20:]) / max(len(result.losses[-20:]), 1), 6),
        "first_loss": round(result.losses[0], 6) if result.losses else None,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "device": str(device),
        "torch": torch.__version__,
    }
    steer = SteerFile.create(
        result.projector1, projector2, dim_names=config.all_dims, epsilon=config.epsilon,
        primary_dim=config.dim_names[0], bias_dims={config.bias_dim: config.bias_value} if config.bias_dim else {},
        base_model=base_model or str(model), fingerprint=fingerprint, recipe=recipe,
        source="trained with vllm-steer train", max_abs_value=max_abs_value,
    )
    return steer, result
