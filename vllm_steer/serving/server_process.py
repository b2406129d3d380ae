"""The server process helper: start an OpenAI-compatible vLLM server (with or without the plugin)
as a child process and wait until it answers; what the demo, the tests and the benchmarks share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Flags that make vLLM's CPU backend start on these machines (see the README's limits).
CPU_SERVER_ARGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started from `command` (its --port is appended); `url` is its /v1 base.
    Its output goes to `log_path`, which is shown when it fails to come up."""

    def __init__(self, command: list[str], log_path: str | Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 600.0) -> int:
        """For a server expected to refuse to start: its exit code."""
        return self.proc.wait(timeout=timeout)

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
