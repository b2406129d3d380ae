"""A server with a steer that does not fit refuses to start, with a clear error: before vLLM starts where the
file itself is wrong (run in this process: `vllm-steer serve` exits with status 2 and never starts vLLM), and
when the model is loaded where it is the model that the steer does not fit (real servers, which must exit).
The four servers that must exit are started at once, to share the start-up wait."""

from __future__ import annotations

import pytest
import torch
from helpers import ENGINE_ARGS, SERVER_ENV, random_steer, refused_by_cli
from safetensors.torch import save_file

from vllm_steer import SteerFile, embedding_fingerprint
from vllm_steer.testing import ServerProcess, steer_server_command


@pytest.fixture(scope="module")
def refused(model_dir, output_embedding, tmp_path_factory) -> dict[str, str]:
    """name -> the log of a server of the default model that exited with a non-zero status:
    "hidden_size": a steer for a 64-dim model; "fingerprint": a steer fingerprinted on another embedding;
    "folder_stranger": a --steer-dir folder holding another model's steer beside a good one;
    "folder_budget": a --steer-dir folder over --steer-memory-budget."""
    folder = tmp_path_factory.mktemp("refused")
    fp = embedding_fingerprint(output_embedding)
    g = torch.Generator().manual_seed(0)
    SteerFile.create(torch.randn(1, 64, 8, generator=g), torch.randn(1, 64, 8, generator=g), dim_names=["x"],
                     base_model="some-64-dim-model").save(folder / "d64.safetensors")
    other_embedding = torch.randn(49152, 576)  # the right shape, but not this model's
    random_steer(["x"], 8, 0, embedding_fingerprint(other_embedding)).save(folder / "other.safetensors")
    stranger = folder / "stranger_folder"
    stranger.mkdir()
    random_steer(["a"], 4, 0, fp).save(stranger / "a.safetensors")
    random_steer(["x"], 4, 1, embedding_fingerprint(other_embedding)).save(stranger / "stranger.safetensors")
    budget = folder / "budget_folder"
    budget.mkdir()
    for i in range(3):
        random_steer([f"s{i}"], 64, i, fp).save(budget / f"s{i}.safetensors")
    cases = {
        "hidden_size": ({"bad": str(folder / "d64.safetensors")}, []),
        "fingerprint": ({"bad": str(folder / "other.safetensors")}, []),
        "folder_stranger": ({}, ["--steer-dir", str(stranger)]),
        "folder_budget": ({}, ["--steer-dir", str(budget), "--steer-memory-budget", "500K"]),
    }
    procs = {name: ServerProcess(steer_server_command(str(model_dir), steers, *extra, *ENGINE_ARGS),
                                 folder / f"{name}.log", env=SERVER_ENV).start()
             for name, (steers, extra) in cases.items()}
    try:
        codes = {name: proc.wait_exit(timeout=600) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()
    assert all(code != 0 for code in codes.values()), codes
    return {name: proc.log_tail(20000) for name, proc in procs.items()}


def test_wrong_hidden_size_stops_startup(refused):
    assert "steer hidden size D=64 does not match the model's 576" in refused["hidden_size"]
    assert "some-64-dim-model" in refused["hidden_size"]


def test_wrong_model_fingerprint_stops_startup(refused):
    assert "does not fit this model's output embedding" in refused["fingerprint"]


def test_folder_with_another_models_steer_or_over_budget_stops_startup(refused):
    """Refusals that need the model: a steer for another model in the folder, and a folder over the
    memory budget. The server exits with a message naming the steer (or the budget)."""
    assert "steer 'stranger'" in refused["folder_stranger"]
    assert "does not fit this model's output embedding" in refused["folder_stranger"]
    log = refused["folder_budget"]
    assert "over the steer memory budget of 0.5 MiB" in log and "s0" in log


def test_nan_weights_and_garbage_files_are_refused_before_vllm_starts(model_dir, tmp_path, capsys, monkeypatch):
    steer = random_steer(["x"], 8, 0, None)
    p1 = steer.projector1.clone()
    p1[0, 3, 2] = float("nan")
    # Bypass SteerFile's own check to write the poisoned tensor, as a broken tool might.
    save_file({"projector1": p1, "projector2": steer.projector2}, str(tmp_path / "nan.safetensors"),
              metadata=steer.header.to_metadata())
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file")
    for name, message in [("nan.safetensors", "NaN"), ("garbage.safetensors", "not a readable safetensors file"),
                          ("missing.safetensors", "steer file not found")]:
        err = refused_by_cli(["serve", str(model_dir), "--steer", f"bad={tmp_path / name}", *ENGINE_ARGS], capsys,
                             monkeypatch)
        assert message in err, err
