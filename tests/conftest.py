"""Shared fixtures. The expensive parts (the default model, steer files, vLLM servers) are
session-scoped: one engine per test session, as engine start-up costs 30-40 s here."""

from __future__ import annotations

import os
import shutil
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
from helpers import (  # noqa: E402
    CHROMEDRIVER,
    CHROMIUM,
    ENGINE_ARGS,
    SERVER_ENV,
    SHIPPED_STEERS,
    STEER_SERVER_ARGS,
    load_dir_args,
    random_steer,
)
from reference_writers import converted_reference_steers  # noqa: E402

from vllm_steer import (  # noqa: E402
    SteerFile,
    embedding_fingerprint,  # noqa: E402
)
from vllm_steer.launch.cpu_kv_cache import KV_SPACE_ENV  # noqa: E402
from vllm_steer.testing import (  # noqa: E402
    ServerProcess,
    plain_server_command,
    steer_server_command,
)
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding  # noqa: E402

# The fixtures that start vLLM (servers, engines, refused start-ups), a browser, a wheel's venv or the kernel
# compiler: a test that uses one, directly or through another fixture, is marked `slow`.
# `scripts/test.sh -m "not slow"` runs the others (the quick subset, for development); CI runs everything.
SLOW_FIXTURES = frozenset({"servers", "engines", "tp2_tiny", "pp", "dp", "api2", "lora", "many", "keyed", "refused",
                           "browser", "wheel_venv", "compiled", "offline_runs", "reported_version"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter) -> None:
    """After the slowest tests, every server start-up of the run: seconds until ready (or until it exited,
    for one that must refuse), slowest first, named by its log's folder and file."""
    startups = sorted(ServerProcess.STARTUPS, key=lambda s: -s[2])
    if startups:
        terminalreporter.section(f"{len(startups)} server start-ups (a fixture's servers start side by side)")
        for log, outcome, seconds in startups:
            terminalreporter.write_line(f"{seconds:7.1f}s {outcome:9s} {log.parent.name}/{log.stem}")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def output_embedding(model_dir: Path) -> torch.Tensor:
    return default_output_embedding(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """transformers' copy of the default model in float32, and its tokenizer: loaded once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(model_dir)


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
def reference_steers(tmp_path_factory, model_dir, output_embedding):
    """Reference checkpoints converted for the default model (tests/reference_writers.py): ({name: served file},
    {name: the formula's SteerFile}, their folder). The session's steer server serves them."""
    folder = tmp_path_factory.mktemp("reference")
    return (*converted_reference_steers(folder, model_dir, output_embedding.shape[1]), folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_dir) -> tuple[Path, torch.nn.Module, SteerFile, Path]:
    """A random 2-layer Llama (4 heads of 64, 2 KV heads: it splits over 2 ranks and 2 pipeline
    stages) with the default model's tokenizer, saved as a real checkpoint so HF can recompute the
    formula; and a steer for it (K=2 with a bias dim), fingerprinted on its output embedding."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=2048,
                         initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, folder / name)
    g = torch.Generator().manual_seed(3)
    steer = SteerFile.create(torch.randn(2, 256, 16, generator=g) * 0.5, torch.randn(2, 256, 16, generator=g) * 0.5,
                             dim_names=["gamma", "bias"], bias_dims={"bias": 1.0}, epsilon=1e-2, base_model="tiny",
                             fingerprint=embedding_fingerprint(model.get_output_embeddings().weight.detach()))
    steer_path = tmp_path_factory.mktemp("tiny_steer") / "gamma.safetensors"  # not in the model's folder:
    steer.save(steer_path)  # vLLM would load every .safetensors file there as weights
    return folder, model, steer, steer_path


@pytest.fixture(scope="session")
def served_steer_paths(steer_paths, reference_steers) -> dict[str, str]:
    """Every steer the session's steer server starts with: the suite's random steers, the shipped ones and the
    converted reference checkpoints."""
    return {**steer_paths, **SHIPPED_STEERS, **reference_steers[0]}


@pytest.fixture(scope="session")
def servers(model_dir, served_steer_paths, tmp_path_factory):
    """The vllm-steer server and, for comparison, plain vLLM without the plugin; started
    side by side to share the start-up wait. The steer server serves `served_steer_paths` and sizes its
    own KV cache (no VLLM_CPU_KVCACHE_SPACE: test_reference_serving.py checks the size it chose)."""
    logs = tmp_path_factory.mktemp("logs")
    steer = ServerProcess(steer_server_command(str(model_dir), served_steer_paths, *STEER_SERVER_ARGS,
                                               *load_dir_args(tmp_path_factory), *ENGINE_ARGS),
                          logs / "steer_server.log")
    steer.env.pop(KV_SPACE_ENV, None)
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


@pytest.fixture
def worker_steering(monkeypatch):
    """This process as a new vLLM worker process: a fresh WorkerSteering, the old one restored after."""
    from vllm_steer.serving import worker

    fresh = worker.WorkerSteering()
    monkeypatch.setattr(worker, "_STEERING", fresh)
    return fresh


@pytest.fixture
def fresh_front_end(monkeypatch):
    """This process as a new API front end: nothing admitted yet (read from VLLM_STEER_CONFIG on first use)."""
    from vllm_steer.serving import front_end

    monkeypatch.setattr(front_end, "_admitted", None)


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium under selenium, for the playground page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{missing} not installed: scripts/setup_venv.sh installs Debian's chromium and " \
                        "chromium-driver (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
