"""Shared fixtures. The expensive parts (the default model, steer files, vLLM servers) are
session-scoped: one engine per test session, as engine start-up costs 30-40 s here."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Without CUDA the kernel tests run Triton's CPU interpreter, which Triton picks when it is
# first imported (its own @triton.jit library functions are decorated then). Other test
# modules import Triton indirectly (through torch's native ops, vLLM) during collection,
# before test_kernel_triton.py can choose; so choose here, before anything else imports it, and
# take the variable back out so the vLLM servers the tests start do not inherit it.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]

import pytest  # noqa: E402

from vllm_steer import SteerFile, embedding_fingerprint  # noqa: E402
from vllm_steer.serving.server_process import (  # noqa: E402
    CPU_SERVER_ARGS,
    ServerProcess,
    plain_server_command,
    steer_server_command,
)
from vllm_steer.tools import random_steer as random_steers  # noqa: E402
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding  # noqa: E402

# Prefix caching and chunked prefill on, with a token budget small enough that the long
# prompt in the isolation test is prefilled in several chunks.
ENGINE_ARGS = [*CPU_SERVER_ARGS, "--max-num-seqs", "32", "--enable-prefix-caching", "--enable-chunked-prefill",
               "--max-num-batched-tokens", "128", "--seed", "0"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The session's steer server also runs the runtime registry, and bounds beta more tightly.
STEER_SERVER_ARGS = ["--allow-runtime-updates", "--steer-bound", "beta=20"]
# Large enough that +-5 changes greedy text, small enough that it stays text: at s=5 the
# steer moves h by roughly a fifth of its norm (eps * s * sigma^2 * sqrt(r * D) ~ 0.2).
STEER_SIGMA = 0.45


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def output_embedding(model_dir: Path) -> torch.Tensor:
    return default_output_embedding(model_dir)


def random_steer(dim_names: list[str], rank: int, seed: int, fingerprint: dict | None, **kw) -> SteerFile:
    """A random steer for the default model (D = 576) at the suite's strength."""
    return random_steers.random_steer(dim_names, 576, rank, seed=seed, sigma=STEER_SIGMA, fingerprint=fingerprint,
                                      base_model="SmolLM2-135M-Instruct", **kw)


@pytest.fixture(scope="session")
def steer_paths(tmp_path_factory, output_embedding) -> dict[str, str]:
    """Two random steers: alpha has a bias dim held at 1 (the reference's layout), beta one dim."""
    folder = tmp_path_factory.mktemp("steers")
    fp = embedding_fingerprint(output_embedding)
    steers = {
        "alpha": random_steer(["alpha", "bias"], 64, 1, fp, bias_dims={"bias": 1.0}),
        "beta": random_steer(["beta"], 32, 2, fp),
    }
    paths = {}
    for name, steer in steers.items():
        paths[name] = str(folder / f"{name}.safetensors")
        steer.save(paths[name])
    return paths


@pytest.fixture(scope="session")
def servers(model_dir, steer_paths, tmp_path_factory):
    """The vllm-steer server and, for comparison, plain vLLM without the plugin; started
    side by side to share the start-up wait."""
    logs = tmp_path_factory.mktemp("logs")
    steer = ServerProcess(steer_server_command(str(model_dir), steer_paths, *STEER_SERVER_ARGS, *ENGINE_ARGS),
                          logs / "steer_server.log", env=SERVER_ENV)
    plain = ServerProcess(plain_server_command(str(model_dir), *ENGINE_ARGS), logs / "plain_server.log",
                          env={**SERVER_ENV, "VLLM_PLUGINS": ""})
    steer.start()
    plain.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.wait_ready(), [steer, plain]))
        yield {"steer": steer, "plain": plain}
    finally:
        steer.stop()
        plain.stop()
        if os.environ.get("VLLM_STEER_SHOW_SERVER_LOGS"):
            print(steer.log_tail(), file=sys.stderr)
