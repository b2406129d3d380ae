"""Training speed: cached final hidden states (vllm-steer train) against recomputing the whole
forward pass every step (the reference's way), on the same data, recipe and machine.

Each path runs a few timed steps (after one warm-up step) and is extrapolated to the recipe's
step count; the cached path also pays its one-off pass over the data.

    .venv/bin/python benchmarks/train_speed.py [--data steers/data/sentiment.jsonl] [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from vllm_steer.testing import recompute_step_loss
from vllm_steer.tools.default_model import default_model_dir
from vllm_steer.tools.hf_model import load_frozen_model, output_head
from vllm_steer.tools.hidden_cache import build_cache
from vllm_steer.tools.training import (
    TrainConfig,
    batch_order,
    cached_step_loss,
    initial_projectors,
    prepare_examples,
    training_vectors,
)
from vllm_steer.tools.training_data import load_labelled_file

ROOT = Path(__file__).resolve().parent.parent


def time_steps(step_loss, config: TrainConfig, hidden_size: int, num_examples: int, steps: int) -> float:
    """Seconds per optimiser step (mean over `steps`, after one warm-up step)."""
    p1, p2 = (p.requires_grad_(True) for p in initial_projectors(config, hidden_size))
    optimizer = torch.optim.Adam([p1, p2], lr=config.lr)
    times = []
    for step in range(steps + 1):
        ids = batch_order(num_examples, config.batch_size, config.seed, step)
        began = time.perf_counter()
        loss = step_loss(ids, p1, p2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - began)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "steers" / "data" / "sentiment.jsonl"))
    parser.add_argument("--steps", type=int, default=1000, help="the recipe's steps, for the extrapolation")
    parser.add_argument("--timed-cached", type=int, default=8)
    parser.add_argument("--timed-recompute", type=int, default=4)
    parser.add_argument("--rank", type=int, help="default: the reference's min(1000, D)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed"))
    args = parser.parse_args()

    lm, tokenizer = load_frozen_model(default_model_dir())
    weight, bias = output_head(lm)
    config = TrainConfig(dim_names=["sentiment"], rank=args.rank, steps=args.steps)
    examples = load_labelled_file(args.data, config.dim_names)
    token_ids, labels = prepare_examples(config, tokenizer, examples)
    began = time.perf_counter()
    cache = build_cache(lm, token_ids, labels)
    cache_seconds = time.perf_counter() - began
    vectors = training_vectors(config, cache.labels)
    d = weight.shape[1]
    n = cache.num_examples
    per_step = {}
    for head_dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(**{**config.__dict__, "head_dtype": head_dtype})
        per_step[f"cached_{head_dtype}"] = time_steps(
            lambda ids, p1, p2, cfg=cfg: cached_step_loss(cfg, cache, vectors, ids, p1, p2, weight, bias, "cpu"),
            cfg, d, n, args.timed_cached)
    per_step["recompute_float32"] = time_steps(
        lambda ids, p1, p2: recompute_step_loss(config, lm, token_ids, vectors, ids, p1, p2, "cpu",
                                                pad_id=tokenizer.pad_token_id or 0),
        config, d, n, args.timed_recompute)
    full = per_step["recompute_float32"] * args.steps
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch threads {torch.get_num_threads()}, shared with other jobs",
        "model": "SmolLM2-135M-Instruct (D=576, V=49152), float32",
        "data": {"file": os.path.relpath(args.data, ROOT), "examples": n, "target_tokens": int(cache.targets.numel())},
        "recipe": {"steps": args.steps, "batch_size": config.batch_size, "rank": config.resolved_rank(d),
                   "max_length": config.max_length},
        "cache_pass_seconds": round(cache_seconds, 2),
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "extrapolated_total_seconds": {
            "recompute_float32": round(full, 1),
            **{k: round(cache_seconds + v * args.steps, 1) for k, v in per_step.items() if k.startswith("cached")},
        },
    }
    result["speedup_total"] = {k: round(full / v, 2) for k, v in result["extrapolated_total_seconds"].items()
                               if k.startswith("cached")}
    result["speedup_per_step"] = {k: round(per_step["recompute_float32"] / v, 2) for k, v in per_step.items()
                                  if k.startswith("cached")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"| path | s/step | total for {args.steps} steps (s) | speed-up |", "|---|---|---|---|",
             f"| recompute every step (reference), fp32 | {per_step['recompute_float32']:.3f} | {full:.0f} | 1.0x |"]
    for k in ("cached_float32", "cached_bfloat16"):
        lines.append(f"| cached hidden states, head {k.split('_')[1]} | {per_step[k]:.3f} | "
                     f"{result['extrapolated_total_seconds'][k]:.0f} (incl. {cache_seconds:.0f} s cache pass) | "
                     f"{result['speedup_total'][k]:.1f}x |")
    Path(args.out + ".md").write_text(f"{result['machine']}, {result['date']}; data {result['data']}\n\n"
                                      + "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
