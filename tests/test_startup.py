"""A server with a steer that does not fit refuses to start, with a clear error, and so does
a model runner the plugin cannot steer under."""

from __future__ import annotations

import torch
from helpers import ENGINE_ARGS, SERVER_ENV, random_steer

from vllm_steer import SteerFile, embedding_fingerprint
from vllm_steer.testing import ServerProcess, steer_server_command


def refused_start(model_dir, steer_path, tmp_path) -> str:
    server = ServerProcess(steer_server_command(str(model_dir), {"bad": str(steer_path)}, *ENGINE_ARGS),
                           tmp_path / "server.log", env=SERVER_ENV).start()
    try:
        assert server.wait_exit(timeout=300) != 0
    finally:
        server.stop()
    return server.log_tail(20000)


def test_wrong_hidden_size_stops_startup(model_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    SteerFile.create(torch.randn(1, 64, 8, generator=g), torch.randn(1, 64, 8, generator=g), dim_names=["x"],
                     base_model="some-64-dim-model").save(tmp_path / "d64.safetensors")
    log = refused_start(model_dir, tmp_path / "d64.safetensors", tmp_path)
    assert "steer hidden size D=64 does not match the model's 576" in log
    assert "some-64-dim-model" in log


def test_wrong_model_fingerprint_stops_startup(model_dir, tmp_path):
    other = torch.randn(49152, 576)  # an embedding of the right shape, but not this model's
    random_steer(["x"], 8, 0, embedding_fingerprint(other)).save(tmp_path / "other.safetensors")
    log = refused_start(model_dir, tmp_path / "other.safetensors", tmp_path)
    assert "does not fit this model's output embedding" in log


def test_nan_weights_and_garbage_files_are_refused_before_vllm_starts(model_dir, tmp_path):
    steer = random_steer(["x"], 8, 0, None)
    p1 = steer.projector1.clone()
    p1[0, 3, 2] = float("nan")
    # Bypass SteerFile's own check to write the poisoned tensor, as a broken tool might.
    from safetensors.torch import save_file

    save_file({"projector1": p1, "projector2": steer.projector2}, str(tmp_path / "nan.safetensors"),
              metadata=steer.header.to_metadata())
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file")
    for name, message in [("nan.safetensors", "NaN"), ("garbage.safetensors", "not a readable safetensors file"),
                          ("missing.safetensors", "steer file not found")]:
        log = refused_start(model_dir, tmp_path / name, tmp_path)
        assert message in log, log
        assert "Starting vLLM" not in log and "EngineCore" not in log
