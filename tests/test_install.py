"""A real pip install: the package built as a wheel (not editable) from the repository's files and installed
by pip into a new venv gives a working `vllm-steer` command, both vLLM entry points (found and loaded
through importlib.metadata, as vLLM finds them), `vllm_steer.kernels`, the playground page and the CPU steer op.

The new venv sees vLLM, torch and the other dependencies through a .pth file naming this project's venv's
site-packages (installing them again would take minutes and gigabytes: the wheel is installed with
`--no-deps`). A .pth line adds a folder to sys.path without running the .pth files in it, so the
project's editable install is not active there: vllm_steer comes from the wheel alone, which the test
checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = '''
import json, os, sys
from importlib import resources
from importlib.metadata import distribution, entry_points

import torch

import vllm_steer, vllm_steer.kernels
from vllm_steer import SteerFile
from vllm_steer.steer.bank import CPU_STORAGE, SteerBank
from vllm_steer.steer.formula import steered_hidden

found = {}
for group in ("vllm.general_plugins", "vllm.endpoint_plugins"):
    (ep,) = [ep for ep in entry_points(group=group) if ep.name == "vllm_steer"]
    found[group] = {"value": ep.value, "dist": str(ep.dist.locate_file("")), "loaded": ep.load().__name__}

register_plugin = entry_points(group="vllm.general_plugins")["vllm_steer"].load()
register_plugin()  # with VLLM_STEER_CONFIG set: installs the steered logits layer, as in every vLLM process
from vllm.model_executor.custom_op import op_registry_oot

from vllm_steer.plugin import SteerLogitsProcessor

# The CPU op from the installed kernels against the formula, on a shipped steer.
steer = SteerFile.load(sys.argv[1])
bank = SteerBank.pack({"s": steer}, CPU_STORAGE)
h = torch.randn(3, steer.header.hidden_size, generator=torch.Generator().manual_seed(0))
values = torch.tensor([[4.0, 1.0], [-2.0, 1.0], [0.0, 0.0]])
rows, vals = [], []
for row in values.tolist():
    idx, v = bank.row_entries({"s": row})
    rows.append(idx + [-1] * (1 - len(idx)))
    vals.append((v + [[0.0] * 2])[:1])
got = bank.steer(h, torch.tensor(rows, dtype=torch.int32), torch.tensor(vals))
want = steered_hidden(h.double(), values.double(), steer.projector1.double(), steer.projector2.double(),
                      steer.header.epsilon)
print("RESULT " + json.dumps({
    "package": vllm_steer.__file__, "kernels": vllm_steer.kernels.__file__,
    "dist": str(distribution("vllm-steer").locate_file("")), "entry_points": found,
    "layer": op_registry_oot.get("LogitsProcessor").__name__, "processor": SteerLogitsProcessor.__name__,
    "playground": str(resources.files("vllm_steer.serving") / "playground.html"),
    "op_error": float((got.double() - want).abs().max()), "steer_effect": float((want - h.double()).abs().max()),
}))
'''


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A new venv with the wheel built from the repository's files installed in it."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(work / "dist"), str(source)], check=True)
    (wheel,) = (work / "dist").glob("vllm_steer-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "vllm_steer_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    return venv


def run_in(venv: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VLLM_STEER_CONFIG", "VLLM_PLUGINS", "PYTHONPATH")}
    return subprocess.run(list(command), cwd=venv.parent, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_gives_a_working_command(wheel_venv):
    command = wheel_venv / "bin" / "vllm-steer"
    assert command.is_file()
    shown = run_in(wheel_venv, str(command), "--help")
    assert shown.returncode == 0, shown.stderr
    for subcommand in ("serve", "convert", "train", "inspect", "keywords", "transfer", "compose"):
        assert subcommand in shown.stdout
    inspected = run_in(wheel_venv, str(command), "inspect", str(ROOT / "steers" / "sentiment.safetensors"))
    assert inspected.returncode == 0, inspected.stderr
    assert "sentiment" in inspected.stdout and "576" in inspected.stdout


def test_the_wheel_gives_both_entry_points_the_kernels_and_the_cpu_op(wheel_venv, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    config = json.dumps({"steers": {"s": str(ROOT / "steers" / "sentiment.safetensors")}})
    done = run_in(wheel_venv, str(wheel_venv / "bin" / "python"), str(script),
                  str(ROOT / "steers" / "sentiment.safetensors"), env={"VLLM_STEER_CONFIG": config})
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    installed = str(wheel_venv)
    for key in ("package", "kernels", "dist", "playground"):
        assert result[key].startswith(installed), (key, result[key])  # not the project's editable install
    assert result["kernels"].endswith("vllm_steer/kernels/__init__.py")
    assert "vllm-steer playground" in Path(result["playground"]).read_text()  # the page is in the wheel
    assert result["entry_points"] == {
        "vllm.general_plugins": {"value": "vllm_steer.plugin:register_plugin", "dist": result["dist"],
                                 "loaded": "register_plugin"},
        "vllm.endpoint_plugins": {"value": "vllm_steer.plugin:SteerEndpoints", "dist": result["dist"],
                                  "loaded": "SteerEndpoints"},
    }
    assert result["layer"] == "SteeredLogitsLayer" and result["processor"] == "SteerLogitsProcessor"
    assert result["op_error"] < 1e-4 < result["steer_effect"]
