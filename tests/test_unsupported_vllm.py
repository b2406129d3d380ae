"""vllm-steer on a vLLM it does not support: installed but not configured, vLLM runs as if it were not
installed (one warning); configured, every way of starting a steered engine refuses with a message naming
the version found and the versions supported, never a traceback. And on the supported vLLM, installed but
not configured, the plugin changes nothing in vLLM either.

The only vLLM that runs here is 0.32, so the unsupported one is the real vLLM 0.32 engine reporting the
version 0.34.0: a `sitecustomize` module on PYTHONPATH (inherited by every process vLLM spawns) replaces
`vllm._version` and nothing else. That stand-in is this file's one mock: no unsupported vLLM can be
installed beside the supported one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import CPU_SERVER_ARGS, SERVER_ENV
from openai import OpenAI

from vllm_steer.testing import ServerProcess, plain_server_command, steer_server_command

FAKE_VERSION = "0.34.0"
INACTIVE_WARNING = "vllm-steer is installed but inactive"
REFUSAL = f"vllm-steer supports vLLM 0.32.x and 0.33.x; this environment has vLLM {FAKE_VERSION}"

SITECUSTOMIZE = f'''
import importlib.abc, importlib.machinery, sys

class _ReportedVersion(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """vllm._version, saying {FAKE_VERSION}."""

    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "vllm._version" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__version__ = module.version = "{FAKE_VERSION}"
        module.__version_tuple__ = module.version_tuple = (0, 34, 0)

sys.meta_path.insert(0, _ReportedVersion())
'''

# vllm.LLM with the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so that what the plugin
# would have changed can be looked at afterwards: the registered layers, the worker's methods, the
# request classes' beam-search conversion.
OFFLINE = '''
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    import vllm
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
    out = llm.generate(["The weather today is"], SamplingParams(max_tokens=6, temperature=0))
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.v1.worker.worker_base import WorkerBase
    print("RESULT " + json.dumps({
        "version": vllm.__version__, "tokens": len(out[0].outputs[0].token_ids),
        "oot_layers": sorted(op_registry_oot), "steer_worker_methods": [m for m in dir(WorkerBase) if "steer" in m],
        "beam_search_wrapped": hasattr(CompletionRequest.to_beam_search_params, "_vllm_steer_patch"),
    }))
'''


@pytest.fixture(scope="module")
def reported_version(tmp_path_factory) -> dict[str, str]:
    """The environment that makes vLLM report FAKE_VERSION in every process it starts."""
    folder = tmp_path_factory.mktemp("vllm_reports_0_34")
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    return {"PYTHONPATH": str(folder)}


def run(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VLLM_STEER_CONFIG", "VLLM_PLUGINS")}
    return subprocess.run(command, env={**clean, **SERVER_ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def offline_runs(tiny_model, reported_version, tmp_path_factory) -> dict[bool, subprocess.CompletedProcess]:
    """The OFFLINE script on a vLLM reporting FAKE_VERSION (True) and on the real one (False), side by side."""
    script = tmp_path_factory.mktemp("offline") / "offline.py"
    script.write_text(OFFLINE)

    def offline(unsupported: bool) -> subprocess.CompletedProcess:
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(reported_version if unsupported else {})}
        return run([sys.executable, str(script), str(tiny_model[0])], env)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([True, False], pool.map(offline, [True, False]), strict=True))


@pytest.mark.parametrize("unsupported", [True, False], ids=["vllm-0.34", "vllm-0.32"])
def test_installed_but_unconfigured_changes_nothing_in_vllm_llm(offline_runs, unsupported):
    done = offline_runs[unsupported]
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["version"] == (FAKE_VERSION if unsupported else "0.32.0")
    assert result["tokens"] == 6
    assert result["oot_layers"] == [] and result["steer_worker_methods"] == []
    assert result["beam_search_wrapped"] is False
    assert output.count(INACTIVE_WARNING) == (1 if unsupported else 0), output[-6000:]


def test_installed_but_unconfigured_on_an_unsupported_vllm_serves_unsteered(tiny_model, reported_version, tmp_path):
    """Plain vLLM's OpenAI server (every general plugin loaded, VLLM_PLUGINS unset) starts and answers; the
    warning appears once in the log of all its processes."""
    server = ServerProcess(plain_server_command(str(tiny_model[0]), *CPU_SERVER_ARGS, "--enforce-eager"),
                           tmp_path / "server.log", env={**SERVER_ENV, **reported_version})
    server.env.pop("VLLM_STEER_CONFIG", None)
    server.env.pop("VLLM_PLUGINS", None)
    with server:
        client = OpenAI(base_url=server.url, api_key="none")
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="The weather today is", max_tokens=5, temperature=0)
        assert answer.usage.completion_tokens == 5
        log = server.log_tail(10**7)
    assert log.count(INACTIVE_WARNING) == 1, log[-6000:]
    assert FAKE_VERSION in log


def test_configured_on_an_unsupported_vllm_is_refused_without_a_traceback(tiny_model, reported_version):
    folder, _, _, steer_path = tiny_model
    config = json.dumps({"steers": {"gamma": str(steer_path)}})
    starts = {
        "vllm-steer serve": (steer_server_command(str(folder), {"gamma": str(steer_path)}, *CPU_SERVER_ARGS), {}),
        "vLLM's server with the processor": (
            plain_server_command(str(folder), *CPU_SERVER_ARGS, "--logits-processors",
                                 "vllm_steer.plugin:SteerLogitsProcessor"), {"VLLM_STEER_CONFIG": config}),
        "vLLM's server with the steers configured only": (
            plain_server_command(str(folder), *CPU_SERVER_ARGS), {"VLLM_STEER_CONFIG": config}),
    }
    with ThreadPoolExecutor(len(starts)) as pool:  # side by side: each is a whole vLLM import
        runs = dict(zip(starts, pool.map(lambda start: run(start[0], {**reported_version, **start[1]}, timeout=300),
                                         starts.values()), strict=True))
    for name, done in runs.items():
        output = done.stdout + done.stderr
        assert done.returncode != 0, (name, output[-4000:])
        assert REFUSAL in output, (name, output[-4000:])
        assert "Traceback" not in output, (name, output[-4000:])
        assert "EngineCore" not in output, (name, output[-4000:])  # refused before any engine started


def test_steered_llm_on_an_unsupported_vllm_raises_naming_the_versions(monkeypatch, tiny_model):
    from vllm_steer import steered_llm
    from vllm_steer.serving import vllm_internals

    monkeypatch.setattr(vllm_internals, "vllm_version", lambda: FAKE_VERSION)
    monkeypatch.delenv("VLLM_STEER_CONFIG", raising=False)
    with pytest.raises(vllm_internals.UnsupportedVllm, match=REFUSAL.replace(".", r"\.")):
        steered_llm(str(tiny_model[0]), {"gamma": tiny_model[3]})
    assert "VLLM_STEER_CONFIG" not in os.environ  # refused before anything was set up
