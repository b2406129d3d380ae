"""Reference LM-Steer checkpoints, written as the reference's scripts write them (train.py with its
Namespace, steer_transfer.py with None; storages tagged cuda:0), converted by `vllm-steer convert`
and served by `vllm-steer serve` on the real vLLM CPU engine: a scalar value v must be the
reference's [v, 1], checked against the formula computed independently from the checkpoint's own
tensors. The same server starts without VLLM_CPU_KVCACHE_SPACE and without
--gpu-memory-utilization, so it also checks the KV cache `vllm-steer serve` chooses on the CPU build."""

from __future__ import annotations

import math
import os
import re
import sys

import pytest
import torch
from helpers import complete, hf_steered_logprobs, token_ids
from reference_writers import head_namespace, write_train_checkpoint, write_transfer_checkpoint

from vllm_steer import SteerFile
from vllm_steer.cli import main
from vllm_steer.launch.cpu_kv_cache import KV_SPACE_ENV, size_kv_cache
from vllm_steer.testing import ServerProcess, steer_server_command

D = 576
MAX_MODEL_LEN, MAX_NUM_SEQS = 1024, 4
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
               "--seed", "0"]
PROMPTS = ["The weather in the mountains this weekend", "Our team meeting this morning was"]
VALUES = [5, -3, 0]
TOLERANCE = 2e-3  # nats, as the parity test in test_serving.py (float32 on both sides, different kernels)


def randn(*shape: int, seed: int, sigma: float) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * sigma


def convert(*argv: str) -> None:
    main(["convert", *argv])


@pytest.fixture(scope="module")
def reference_steers(tmp_path_factory, model_dir):
    """name -> (served file, the formula's SteerFile built from the checkpoint's own tensors and the
    eps the reference trained with). Sigmas give a 20% move of h at v=5, as the suite's steers."""
    folder = tmp_path_factory.mktemp("reference")
    expected, served = {}, {}

    # train.py, README recipe (K=2, rank 1000, dummy dim 1, eps 1e-3), trained with --cuda.
    p1, p2 = randn(2, D, 1000, seed=11, sigma=0.23), randn(2, D, 1000, seed=12, sigma=0.23)
    write_train_checkpoint(folder / "train.pt", p1, p2, head_namespace(model_name="SmolLM2-135M"), cuda=True)
    convert(str(folder / "train.pt"), str(folder / "train.safetensors"), "--model", str(model_dir),
            "--dim-names", "train,bias")
    expected["train"], served["train"] = (p1, p2, 1e-3), folder / "train.safetensors"

    # steer_transfer.py from a 64-dim model's steer trained with eps 2e-3: given on the command line.
    p1, p2 = write_transfer_checkpoint(folder / "transfer.pt", randn(2, 64, 64, seed=21, sigma=0.32),
                                       randn(2, 64, 64, seed=22, sigma=0.32), hidden_to=D, seed=23)
    convert(str(folder / "transfer.pt"), str(folder / "transfer.safetensors"), "--epsilon", "2e-3",
            "--dim-names", "transfer,bias", "--bias-dim", "bias=1")
    expected["transfer"], served["transfer"] = (p1, p2, 2e-3), folder / "transfer.safetensors"

    # steer_transfer.py again, source eps 1e-3: --assume-defaults.
    p1, p2 = write_transfer_checkpoint(folder / "assumed.pt", randn(2, 64, 64, seed=31, sigma=0.45),
                                       randn(2, 64, 64, seed=32, sigma=0.45), hidden_to=D, seed=33)
    convert(str(folder / "assumed.pt"), str(folder / "assumed.safetensors"), "--assume-defaults")
    expected["assumed"], served["assumed"] = (p1, p2, 1e-3), folder / "assumed.safetensors"

    formula = {name: SteerFile.create(a, b, dim_names=["primary", "dummy"], epsilon=eps)
               for name, (a, b, eps) in expected.items()}
    return {name: str(path) for name, path in served.items()}, formula, folder


@pytest.fixture(scope="module")
def server(model_dir, reference_steers, tmp_path_factory):
    paths, _, _ = reference_steers
    log = tmp_path_factory.mktemp("logs") / "reference_server.log"
    proc = ServerProcess(steer_server_command(str(model_dir), paths, *SERVER_ARGS), log)
    proc.env.pop(KV_SPACE_ENV, None)  # the point: vllm-steer serve sizes the KV cache itself
    proc.start()
    try:
        yield proc.wait_ready(timeout=1200)  # start-up takes minutes on a loaded 2-core machine
    finally:
        proc.stop()
        if os.environ.get("VLLM_STEER_SHOW_SERVER_LOGS"):
            print(proc.log_tail(), file=sys.stderr)


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
        convert(str(folder / "transfer.pt"), str(folder / "refused.safetensors"))
    assert not (folder / "refused.safetensors").exists()


@pytest.mark.parametrize("name", ["train", "transfer", "assumed"])
def test_scalar_value_serves_the_reference_vector_v_1(server, hf_model, reference_steers, name):
    """`steer_<name>: v` equals the formula at [v, 1] (the reference's --steer_values v 1) within
    the parity tolerance, and is far from [v, 0], which is what a lost dummy dim would serve."""
    model, tokenizer = hf_model
    _, formula, _ = reference_steers
    worst, nearest_wrong = 0.0, math.inf
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        for v in VALUES:
            choice = complete(server, ids, {f"steer_{name}": v}, max_tokens=8, logprobs=1).choices[0]
            gen = token_ids(choice)
            right = hf_steered_logprobs(model, ids + gen, formula, {f"steer_{name}": [v, 1.0]})
            wrong = hf_steered_logprobs(model, ids + gen, formula, {f"steer_{name}": [v, 0.0]})
            rows, gen = torch.arange(len(ids) - 1, len(ids) - 1 + len(gen)), torch.tensor(gen)
            served = torch.tensor(choice.logprobs.token_logprobs, dtype=torch.float64)
            worst = max(worst, (served - right[rows, gen]).abs().max().item())
            nearest_wrong = min(nearest_wrong, (served - wrong[rows, gen]).abs().max().item())
    assert worst < TOLERANCE, f"{name}: largest |served - formula at [v, 1]| = {worst}"
    assert nearest_wrong > 20 * TOLERANCE, f"{name}: [v, 0] is too close for the test to tell: {nearest_wrong}"


def test_reference_steers_compose(server, hf_model, reference_steers):
    model, tokenizer = hf_model
    _, formula, _ = reference_steers
    ids = tokenizer(PROMPTS[0])["input_ids"]
    choice = complete(server, ids, {"steer_train": 3, "steer_transfer": -4}, max_tokens=8, logprobs=1).choices[0]
    gen = token_ids(choice)
    right = hf_steered_logprobs(model, ids + gen, formula, {"steer_train": [3, 1.0], "steer_transfer": [-4, 1.0]})
    rows, gen = torch.arange(len(ids) - 1, len(ids) - 1 + len(gen)), torch.tensor(gen)
    served = torch.tensor(choice.logprobs.token_logprobs, dtype=torch.float64)
    assert (served - right[rows, gen]).abs().max().item() < TOLERANCE


def test_serve_chose_the_kv_cache_on_the_cpu_build(server):
    """Without VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes, `vllm-steer serve` sized the KV
    cache for --max-num-seqs full-length requests, and vLLM allocated exactly that."""
    log = server.log_path.read_text(errors="replace")
    expected = size_kv_cache(46_080, 128, MAX_MODEL_LEN, MAX_NUM_SEQS)  # the default model in float32
    ours = re.search(r"vllm-steer: CPU build: KV cache ([\d.]+) GiB = ([\d,]+) tokens", log)
    assert ours, log[-4000:]
    assert int(ours.group(2).replace(",", "")) == expected.tokens == MAX_NUM_SEQS * MAX_MODEL_LEN
    assert "Explicitly set (" in log and "Auto set (" not in log
    assert f"CPU KV cache size: {expected.tokens:,} tokens" in log
