"""What the tests, the benchmarks and the demo share to run and check vllm-steer, and users may use for their
own: servers started as child processes (`vllm-steer serve`, or plain vLLM for comparisons) and waited for,
random steers of any shape, and the reference's training step. Nothing of the plugin or the tools uses it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import embedding_fingerprint
from vllm_steer.steer.formula import steered_hidden
from vllm_steer.tools.hf_model import final_hidden_states, output_head
from vllm_steer.tools.training import TrainConfig, regularisation

# Flags that make vLLM's CPU backend start on these machines (see the README's limits).
CPU_SERVER_ARGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started from `command` (its --port is appended); `url` is its /v1 base.
    Its output goes to `log_path`, which is shown when it fails to come up. Each start-up's outcome
    ("ready", or "exited N" for a server expected to refuse) and seconds are appended to `STARTUPS`."""

    STARTUPS: list[tuple[Path, str, float]] = []  # (log_path, outcome, seconds from start), this process's servers

    def __init__(self, command: list[str], log_path: str | Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.exited_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        self.started_at = time.monotonic()
        threading.Thread(target=self._note_exit, daemon=True).start()
        return self

    def _note_exit(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    def _record(self, outcome: str) -> None:
        end = self.exited_at if self.exited_at is not None else time.monotonic()
        ServerProcess.STARTUPS.append((self.log_path, outcome, end - self.started_at))

    def wait_ready(self, timeout: float = 600.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        self._record("ready")
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 600.0) -> int:
        """For a server expected to refuse to start: its exit code."""
        code = self.proc.wait(timeout=timeout)
        while self.exited_at is None:  # the watcher notes the time it saw the exit
            time.sleep(0.01)
        self._record(f"exited {code}")
        return code

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def steer_server_command(model: str, steers: dict[str, str], *extra: str) -> list[str]:
    """`vllm-steer serve` with the given steers, as a command list."""
    steer_flags = [flag for name, path in steers.items() for flag in ("--steer", f"{name}={path}")]
    return [sys.executable, "-m", "vllm_steer.cli", "serve", model, *steer_flags, *extra]


def plain_server_command(model: str, *extra: str) -> list[str]:
    """vLLM's own server, for comparisons; pair it with env VLLM_PLUGINS="" to keep the
    vllm-steer plugin out."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *extra]


def random_steer(dim_names: Sequence[str], hidden_size: int, rank: int, *, seed: int = 0, sigma: float = 1.0,
                 epsilon: float = 1e-3, embedding: torch.Tensor | None = None, **header_fields: Any) -> SteerFile:
    """A steer whose P1 and P2 ([K, D, r]) are drawn, in that order, from N(0, sigma^2) with a
    generator seeded `seed`; fingerprinted for `embedding` ([V, D]) if given. Other header fields
    (bias_dims, base_model, max_abs_value, ...) pass through to `SteerFile.create`."""
    g = torch.Generator().manual_seed(seed)
    shape = (len(dim_names), hidden_size, rank)
    p1, p2 = (torch.randn(shape, generator=g) * sigma for _ in range(2))
    if embedding is not None:
        header_fields["fingerprint"] = embedding_fingerprint(embedding)
    return SteerFile.create(p1, p2, dim_names=list(dim_names), epsilon=epsilon, **header_fields)


def recompute_step_loss(config: TrainConfig, lm, token_ids: Sequence[Sequence[int]], vectors: torch.Tensor,
                        ids: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, device: torch.device | str,
                        pad_id: int = 0) -> torch.Tensor:
    """One training step's loss the reference's way, recomputing the forward pass: pad the batch, run the
    whole model (no gradient), steer, LM head, cross-entropy with padding masked. What cached training is
    checked against (tests/test_training.py) and timed against (benchmarks/train_speed.py)."""
    seqs = [token_ids[i] for i in ids.tolist()]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.no_grad():
        h = final_hidden_states(lm, input_ids, mask)
    b, t, d = h.shape
    values = vectors[ids].to(device)[:, None, :].expand(b, t, -1).reshape(b * t, -1)
    steered = steered_hidden(h.reshape(b * t, d), values, p1, p2, config.epsilon)
    weight, bias = output_head(lm)
    logits = (steered @ weight.T + (bias if bias is not None else 0)).reshape(b, t, -1)
    labels = input_ids.masked_fill(mask == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss + regularisation(config, p1, p2)
