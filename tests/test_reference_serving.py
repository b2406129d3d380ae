"""Reference LM-Steer checkpoints, written as the reference's scripts write them (train.py with its
Namespace, steer_transfer.py with None; storages tagged cuda:0), converted by `vllm-steer convert`
and served by `vllm-steer serve` on the real vLLM CPU engine: a scalar value v must be the
reference's [v, 1], checked against the formula computed independently from the checkpoint's own
tensors. They are served by the session's steer server (tests/conftest.py), which starts without
VLLM_CPU_KVCACHE_SPACE, so this file also checks the KV cache `vllm-steer serve` chooses on the CPU build."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import ENGINE_ARGS, complete, hf_steered_logprobs, token_ids

from vllm_steer import SteerFile
from vllm_steer.cli import main
from vllm_steer.launch.cpu_kv_cache import size_kv_cache

# The session steer server's sizes, for the KV cache it must have chosen.
MAX_MODEL_LEN, MAX_NUM_SEQS = (int(ENGINE_ARGS[ENGINE_ARGS.index(flag) + 1]) for flag in ("--max-model-len",
                                                                                         "--max-num-seqs"))
PROMPTS = ["The weather in the mountains this weekend", "Our team meeting this morning was"]
VALUES = [5, -3, 0]
TOLERANCE = 2e-3  # nats, as the parity test in test_serving.py (float32 on both sides, different kernels)


def test_conversions_record_what_they_read_and_assumed(reference_steers):
    paths, _, folder = reference_steers
    origins = {name: {k: v["origin"] for k, v in SteerFile.load(p).header.recipe["settings"].items()}
               for name, p in paths.items()}
    assert origins["train"]["bias_dims"] == "read from the Namespace (dummy_steer 1, held at 1)"
    assert origins["transfer"]["epsilon"] == "given on the command line (--epsilon)"
    assert all(o.startswith("assumed") for o in origins["assumed"].values())
    assert SteerFile.load(paths["train"]).header.fingerprint is not None
    assert "head_bias_warning" not in SteerFile.load(paths["train"]).header.recipe  # SmolLM2's head has no bias
    with pytest.raises(SystemExit):  # without options a transfer checkpoint is refused
        main(["convert", str(folder / "transfer.pt"), str(folder / "refused.safetensors")])
    assert not (folder / "refused.safetensors").exists()


@pytest.mark.parametrize("name", ["train", "transfer", "assumed"])
def test_scalar_value_serves_the_reference_vector_v_1(servers, hf_model, reference_steers, name):
    """`steer_<name>: v` equals the formula at [v, 1] (the reference's --steer_values v 1) within
    the parity tolerance, and is far from [v, 0], which is what a lost dummy dim would serve."""
    model, tokenizer = hf_model
    _, formula, _ = reference_steers
    worst, nearest_wrong = 0.0, math.inf
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        for v in VALUES:
            choice = complete(servers["steer"], ids, {f"steer_{name}": v}, max_tokens=8, logprobs=1).choices[0]
            gen = token_ids(choice)
            right = hf_steered_logprobs(model, ids + gen, formula, {f"steer_{name}": [v, 1.0]})
            wrong = hf_steered_logprobs(model, ids + gen, formula, {f"steer_{name}": [v, 0.0]})
            rows, gen = torch.arange(len(ids) - 1, len(ids) - 1 + len(gen)), torch.tensor(gen)
            served = torch.tensor(choice.logprobs.token_logprobs, dtype=torch.float64)
            worst = max(worst, (served - right[rows, gen]).abs().max().item())
            nearest_wrong = min(nearest_wrong, (served - wrong[rows, gen]).abs().max().item())
    assert worst < TOLERANCE, f"{name}: largest |served - formula at [v, 1]| = {worst}"
    assert nearest_wrong > 20 * TOLERANCE, f"{name}: [v, 0] is too close for the test to tell: {nearest_wrong}"


def test_reference_steers_compose(servers, hf_model, reference_steers):
    model, tokenizer = hf_model
    _, formula, _ = reference_steers
    ids = tokenizer(PROMPTS[0])["input_ids"]
    choice = complete(servers["steer"], ids, {"steer_train": 3, "steer_transfer": -4}, max_tokens=8,
                      logprobs=1).choices[0]
    gen = token_ids(choice)
    right = hf_steered_logprobs(model, ids + gen, formula, {"steer_train": [3, 1.0], "steer_transfer": [-4, 1.0]})
    rows, gen = torch.arange(len(ids) - 1, len(ids) - 1 + len(gen)), torch.tensor(gen)
    served = torch.tensor(choice.logprobs.token_logprobs, dtype=torch.float64)
    assert (served - right[rows, gen]).abs().max().item() < TOLERANCE


def test_serve_chose_the_kv_cache_on_the_cpu_build(servers):
    """Without VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes, `vllm-steer serve` sized the KV
    cache for --max-num-seqs full-length requests, and vLLM allocated exactly that."""
    log = servers["steer"].log_path.read_text(errors="replace")
    expected = size_kv_cache(46_080, 128, MAX_MODEL_LEN, MAX_NUM_SEQS)  # the default model in float32
    ours = re.search(r"vllm-steer: CPU build: KV cache ([\d.]+) GiB = ([\d,]+) tokens", log)
    assert ours, log[-4000:]
    assert int(ours.group(2).replace(",", "")) == expected.tokens == MAX_NUM_SEQS * MAX_MODEL_LEN
    assert "Explicitly set (" in log and "Auto set (" not in log
    assert f"CPU KV cache size: {expected.tokens:,} tokens" in log
