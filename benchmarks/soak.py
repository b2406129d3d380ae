"""Soak test (not part of the default test run): a vllm-steer server with two steers under a
few hundred concurrent requests with random steer mixes, ~5% of them intentionally malformed,
for a fixed time, on loopback only; then checks that

- every well-formed request got a 200 and every malformed one a 400 (no other error);
- a sample of the greedy requests answered under load equal the same requests run alone;
- the server's memory is flat: VmRSS of the API server, engine core and worker processes
  (/proc/<pid>/status), sampled through the run; growth reported from start to middle to end.

    .venv/bin/python benchmarks/soak.py --duration 120 --concurrency 200

Bounded: it stops issuing requests after --duration seconds or --max-requests requests, each
request has a timeout, and in-flight requests get --grace seconds to finish. Prints a summary,
writes benchmarks/results/soak.json, and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, random_steer, steer_server_command
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "The weather in the mountains this weekend",
    "I opened the letter from my landlord and",
    "Our team meeting this morning was",
    "The best way to learn a new language is",
    "When the train finally arrived at the station,",
    "My grandmother's recipe for soup starts with",
    "The new phone I bought last week",
    "Here is a short story about a lighthouse keeper who",
]
# (raw JSON text for vllm_xargs, what the 400 must say): the intended malformed requests.
MALFORMED = [
    ('{"steer_nope": 1}', "unknown steer"),
    ('{"steer_first": NaN}', "must be finite"),
    ('{"steer_second": [1, 2, 3]}', "list of 3"),
    ('{"steer_first": "3"}', "got the string"),
    ('{"steer_first": 1e300}', "beyond the allowed range"),
    ('{"steer_first": [Infinity, 1]}', "must be finite"),
    ('{"steer_second": -21}', "beyond the allowed range"),
    ('{"steer_first": [[1, 2]]}', "vllm_xargs"),
]


@dataclass
class Outcome:
    """Everything the load phase saw."""

    sent: int = 0
    ok: int = 0
    rejected_as_intended: int = 0
    unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    greedy: list[tuple[str, dict | None, int, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------- set-up


def make_steers(model_dir: Path, folder: Path) -> dict[str, str]:
    """Two random steers with fingerprints: 'first' (K=2: first + a bias dim held at 1, the
    reference's layout) and 'second' (K=1); strong enough that +-5 changes greedy text."""
    embedding = default_output_embedding(model_dir)
    paths = {}
    for seed, (name, dims, rank) in enumerate([("first", ["first", "bias"], 64), ("second", ["second"], 32)]):
        extra = {"bias_dims": {"bias": 1.0}} if "bias" in dims else {}
        paths[name] = str(folder / f"{name}.safetensors")
        random_steer(dims, embedding.shape[1], rank, seed=100 + seed, sigma=0.45, embedding=embedding,
                     base_model=model_dir.name, **extra).save(paths[name])
    return paths


def machine() -> dict[str, Any]:
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "load_average_at_start": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------- memory


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def rss_by_process(pid: int) -> dict[str, int]:
    """VmRSS in KiB of the server's processes, keyed 'name (pid)'."""
    out = {}
    for p in process_tree(pid):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if "VmRSS" in fields:
            out[f"{fields['Name'].strip()} ({p})"] = int(fields["VmRSS"].split()[0])
    return out


async def sample_memory(pid: int, samples: list[dict], stop: asyncio.Event, every: float) -> None:
    start = time.monotonic()
    while not stop.is_set():
        samples.append({"t": round(time.monotonic() - start, 1), "rss_kib": rss_by_process(pid)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------------------- load


def random_request(rng: random.Random, malformed_fraction: float) -> dict[str, Any]:
    """A request description: its kind, prompt, vllm_xargs (raw JSON text), sampling."""
    if rng.random() < malformed_fraction:
        raw, message = rng.choice(MALFORMED)
        return {"kind": "malformed", "prompt": rng.choice(PROMPTS), "raw_xargs": raw, "expect": message,
                "max_tokens": 8, "temperature": 0.0, "stream": False}
    mix = rng.choice(["unsteered", "first", "second", "both", "full_vector"])
    value = round(rng.uniform(-8, 8), 2)
    xargs: dict | None = {
        "unsteered": None,
        "first": {"steer_first": value},
        "second": {"steer_second": value},
        "both": {"steer_first": value, "steer_second": round(rng.uniform(-8, 8), 2)},
        "full_vector": {"steer_first": [value, round(rng.uniform(-2, 2), 2)]},
    }[mix]
    greedy = rng.random() < 0.7
    return {"kind": mix, "prompt": rng.choice(PROMPTS), "xargs": xargs, "max_tokens": rng.randint(4, 32),
            "temperature": 0.0 if greedy else 1.0, "seed": None if greedy else rng.randint(0, 2**31),
            "stream": rng.random() < 0.25}


def request_body(model: str, req: dict[str, Any]) -> str:
    body: dict[str, Any] = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
                            "temperature": req["temperature"], "stream": req["stream"]}
    if req.get("seed") is not None:
        body["seed"] = req["seed"]
    text = json.dumps(body)
    xargs = req.get("raw_xargs") or (json.dumps(req["xargs"]) if req.get("xargs") else None)
    return text if xargs is None else text[:-1] + f', "vllm_xargs": {xargs}}}'


async def send(http: httpx.AsyncClient, url: str, model: str, req: dict[str, Any]) -> tuple[int, str, int]:
    """(status, text or error message, completion tokens)."""
    body = request_body(model, req)
    headers = {"content-type": "application/json"}
    if not req["stream"]:
        r = await http.post(url, content=body, headers=headers)
        if r.status_code != 200:
            return r.status_code, r.json().get("error", {}).get("message", r.text), 0
        data = r.json()
        return 200, data["choices"][0]["text"], data["usage"]["completion_tokens"]
    pieces, tokens = [], 0
    async with http.stream("POST", url, content=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json().get("error", {}).get("message", r.text), 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, str(chunk["error"]), 0
            for choice in chunk.get("choices", []):
                pieces.append(choice.get("text", ""))
                tokens += 1 if choice.get("text") else 0
    return 200, "".join(pieces), tokens


async def drive(url: str, model: str, args: argparse.Namespace, outcome: Outcome) -> None:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as http:

        async def worker() -> None:
            while time.monotonic() < deadline and outcome.sent < args.max_requests:
                req = random_request(rng, args.malformed_fraction)
                outcome.sent += 1
                outcome.kinds[req["kind"]] = outcome.kinds.get(req["kind"], 0) + 1
                start = time.monotonic()
                try:
                    status, text, tokens = await send(http, url, model, req)
                except Exception as e:  # a timeout, a dropped connection: all unexpected
                    outcome.unexpected.append(f"{req['kind']}: {type(e).__name__}: {e}")
                    continue
                outcome.latencies.append(time.monotonic() - start)
                if req["kind"] == "malformed":
                    if status == 400 and req["expect"] in text:
                        outcome.rejected_as_intended += 1
                    else:
                        outcome.unexpected.append(f"malformed {req['raw_xargs']}: {status} {text[:200]}")
                elif status == 200:
                    outcome.ok += 1
                    outcome.completion_tokens += tokens
                    if req["temperature"] == 0.0:
                        outcome.greedy.append((req["prompt"], req["xargs"], req["max_tokens"], text))
                else:
                    outcome.unexpected.append(f"{req['kind']} {req.get('xargs')}: {status} {text[:200]}")

        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        done, pending = await asyncio.wait(workers, timeout=args.duration + args.grace)
        for task in pending:
            task.cancel()
        if pending:
            outcome.unexpected.append(f"{len(pending)} workers still waiting {args.grace} s after the deadline")
        for task in done:
            if task.exception():
                outcome.unexpected.append(f"worker failed: {task.exception()!r}")


async def solo(url: str, model: str, prompt: str, xargs: dict | None, max_tokens: int) -> str:
    async with httpx.AsyncClient(timeout=300) as http:
        req = {"prompt": prompt, "xargs": xargs, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
        status, text, _ = await send(http, url, model, req)
        assert status == 200, text
        return text


async def soak(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    url = server.url + "/completions"
    async with httpx.AsyncClient(timeout=60) as http:
        model = (await http.get(server.url + "/models")).json()["data"][0]["id"]
    # Warm-up: one concurrent burst of every kind of request, so that the start-of-run memory
    # sample is the server's after its buffers for a full batch exist.
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as http:
        await asyncio.gather(*(send(http, url, model, random_request(rng, 0.2)) for _ in range(args.concurrency)))
    samples: list[dict] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(server.proc.pid, samples, stop, args.memory_every))
    outcome = Outcome()
    started = time.monotonic()
    await drive(url, model, args, outcome)
    elapsed = time.monotonic() - started
    await asyncio.sleep(2.0)
    stop.set()
    await sampler

    # Solo reruns of a sample of the greedy requests answered under load.
    picks = random.Random(args.seed + 2).sample(outcome.greedy, min(args.solo_checks, len(outcome.greedy)))
    mismatches = []
    for prompt, xargs, max_tokens, text in picks:
        alone = await solo(server.url + "/completions", model, prompt, xargs, max_tokens)
        if alone != text:
            mismatches.append({"prompt": prompt, "xargs": xargs, "max_tokens": max_tokens, "under_load": text,
                               "alone": alone})
    final_rss = rss_by_process(server.proc.pid)
    return {"outcome": outcome, "elapsed_s": elapsed, "memory": samples, "solo_checked": len(picks),
            "solo_mismatches": mismatches, "rss_after_solo_kib": final_rss}


def memory_report(samples: list[dict], tolerance: float) -> dict[str, Any]:
    """Total VmRSS at start, middle and end; flat if end-vs-middle growth is within
    `tolerance` (the first half may still grow as caches and allocator pools fill)."""
    totals = [sum(s["rss_kib"].values()) for s in samples]
    start, middle, end = totals[0], totals[len(totals) // 2], totals[-1]
    per_process = {name: {"start_mib": round(samples[0]["rss_kib"].get(name, 0) / 1024, 1),
                          "middle_mib": round(samples[len(samples) // 2]["rss_kib"].get(name, 0) / 1024, 1),
                          "end_mib": round(samples[-1]["rss_kib"].get(name, 0) / 1024, 1)}
                   for name in samples[-1]["rss_kib"]}
    return {"samples": len(totals), "start_mib": round(start / 1024, 1), "middle_mib": round(middle / 1024, 1),
            "end_mib": round(end / 1024, 1), "growth_start_to_end_pct": round(100 * (end - start) / start, 2),
            "growth_middle_to_end_pct": round(100 * (end - middle) / middle, 2),
            "peak_mib": round(max(totals) / 1024, 1), "per_process": per_process,
            "flat": (end - middle) <= tolerance * middle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=200, help="concurrent clients (default %(default)s)")
    p.add_argument("--max-requests", type=int, default=20000, help="stop after this many (default %(default)s)")
    p.add_argument("--malformed-fraction", type=float, default=0.05)
    p.add_argument("--solo-checks", type=int, default=24, help="greedy requests rerun alone (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--grace", type=float, default=300.0, help="seconds in-flight requests get after the deadline")
    p.add_argument("--memory-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--memory-tolerance", type=float, default=0.03, help="allowed middle-to-end RSS growth")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="default: the embedded default model")
    p.add_argument("--output", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)

    model_dir = args.model or default_model_dir()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        steers = make_steers(model_dir, Path(tmp))
        # 'second' gets an operator bound of 20 (the soak's values stay within +-8).
        command = steer_server_command(str(model_dir), steers, "--steer-bound", "second=20", *CPU_SERVER_ARGS,
                                       "--max-num-seqs", str(args.max_num_seqs), "--enable-prefix-caching",
                                       "--seed", "0")
        server = ServerProcess(command, Path(tmp) / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        print(f"soak: starting the server ({' '.join(command[2:])})", file=sys.stderr)
        t0 = time.monotonic()
        with server:
            startup_s = time.monotonic() - t0
            print(f"soak: server up in {startup_s:.0f} s; {args.concurrency} clients for {args.duration:.0f} s",
                  file=sys.stderr)
            result = asyncio.run(soak(server, args))
            alive = httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30).status_code == 200

    outcome: Outcome = result["outcome"]
    memory = memory_report(result["memory"], args.memory_tolerance)
    lat = sorted(outcome.latencies)
    summary = {
        "machine": info,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server_startup_s": round(startup_s, 1),
        "load_s": round(result["elapsed_s"], 1),
        "requests": {"sent": outcome.sent, "ok": outcome.ok, "rejected_as_intended": outcome.rejected_as_intended,
                     "unexpected": len(outcome.unexpected), "by_kind": outcome.kinds},
        "unexpected_examples": outcome.unexpected[:20],
        "throughput": {"requests_per_s": round(len(lat) / result["elapsed_s"], 2),
                       "completion_tokens_per_s": round(outcome.completion_tokens / result["elapsed_s"], 1)},
        "latency_s": {"p50": round(statistics.median(lat), 2) if lat else None,
                      "p95": round(lat[int(0.95 * (len(lat) - 1))], 2) if lat else None,
                      "max": round(lat[-1], 2) if lat else None},
        "solo_checks": {"checked": result["solo_checked"], "mismatches": result["solo_mismatches"]},
        "memory": memory,
        "memory_timeline_mib": [{"t": s["t"], "total": round(sum(s["rss_kib"].values()) / 1024, 1)}
                                for s in result["memory"]],
        "server_alive_after": alive,
    }
    checks = {"no_unexpected_errors": not outcome.unexpected, "malformed_all_400": outcome.rejected_as_intended
              == outcome.kinds.get("malformed", 0), "solo_equal": not result["solo_mismatches"]
              and result["solo_checked"] > 0, "memory_flat": memory["flat"], "server_alive": alive}
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")

    r = summary["requests"]
    print(f"soak: {r['sent']} requests in {summary['load_s']} s ({summary['throughput']['requests_per_s']} req/s, "
          f"{summary['throughput']['completion_tokens_per_s']} tokens/s); ok {r['ok']}, intended 400s "
          f"{r['rejected_as_intended']}, unexpected {r['unexpected']}")
    print(f"soak: latency p50 {summary['latency_s']['p50']} s, p95 {summary['latency_s']['p95']} s, "
          f"max {summary['latency_s']['max']} s")
    print(f"soak: solo reruns {result['solo_checked']}, mismatches {len(result['solo_mismatches'])}")
    print(f"soak: server RSS start {memory['start_mib']} MiB, middle {memory['middle_mib']} MiB, end "
          f"{memory['end_mib']} MiB (start->end {memory['growth_start_to_end_pct']}%, middle->end "
          f"{memory['growth_middle_to_end_pct']}%), peak {memory['peak_mib']} MiB")
    print(f"soak: checks {checks} -> {'PASS' if summary['passed'] else 'FAIL'}; wrote {args.output}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
