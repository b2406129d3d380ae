"""Many steers on one server, end to end on CPU: throughput as the number of loaded steers grows, and
as the number of distinct steers in one batch grows (the shape of EasySteer's published curve).

    .venv/bin/python benchmarks/many_steers.py [--loaded 1 16 64 256 1024] [--repeats 5] [--skip-batch-256]

For each N, one `vllm-steer serve --steer-dir` with N random fingerprinted steers (K=2 with a bias
dim, rank 64; also rank 576 for N <= 64), and one plain vLLM server for the whole run. At batch 64
(the official `openai` client, distinct 32-token prompts, exactly 32 new tokens), workloads take
turns in every repeat: unsteered, every request on its own steer, all on one steer, half
unsteered. Reported: each workload's ratio to the unsteered load on the same server and to vLLM
without the plugin (the median of the ratios within each repeat, and best over best), and each
server's start-up time. Then, on the server with the most steers loaded, distinct steers per batch
1, 8, 32, 64 at batch 64 (and 256 at batch 256). Writes benchmarks/results/many_steers_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from throughput import RESULTS, machine, make_prompts, run_load
from transformers import AutoTokenizer

from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, plain_server_command, random_steer, steer_server_command
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding

BATCH = 64
WORKLOADS = ["unsteered", "own", "one", "half"]


def make_folder(folder: Path, count: int, rank: int, embedding) -> list[str]:
    """`count` random steers (K=2: a style dim and a bias dim held at 1) in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"s{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        random_steer([name, "bias"], embedding.shape[1], rank, seed=i, sigma=0.45, embedding=embedding,
                     bias_dims={"bias": 1.0}).save(folder / f"{name}.safetensors")
    return names


def workload_xargs(kind: str, names: list[str], n: int, distinct: int | None = None) -> list[dict | None]:
    """Per-request vllm_xargs; values differ per request, as a real batch's would."""
    values = [round(-5 + 10 * i / max(n - 1, 1), 3) for i in range(n)]
    if kind == "unsteered":
        return [None] * n
    if kind == "one":
        return [{f"steer_{names[0]}": v} for v in values]
    if kind == "half":
        return [None if i % 2 else {f"steer_{names[i % len(names)]}": v} for i, v in enumerate(values)]
    pool = names[:distinct] if distinct else names
    return [{f"steer_{pool[i % len(pool)]}": v} for i, v in enumerate(values)]


def timed_start(server: ServerProcess) -> float:
    began = time.perf_counter()
    server.start().wait_ready(timeout=1800)
    return time.perf_counter() - began


def bench(servers: dict[str, tuple[ServerProcess, list[str], str]], prompts, args, batch: int) -> dict:
    """tokens/s per (server, workload) over the repeats, the kinds taking turns (order rotated)."""
    jobs = [(key, kind) for key in servers for kind in servers[key][2].split(",")]
    out = {f"{key}/{kind}": [] for key, kind in jobs}
    for repeat in range(args.repeats):
        shift = repeat % len(jobs)
        for key, kind in jobs[shift:] + jobs[:shift]:
            server, names, _ = servers[key]
            xargs = workload_xargs(kind.split(":")[0], names, batch,
                                   int(kind.split(":")[1]) if ":" in kind else None)
            tps = asyncio.run(run_load(server.url, prompts[:batch], xargs, args.output_tokens))
            out[f"{key}/{kind}"].append(tps)
            print(f"  {key:>14} {kind:<12} bs={batch:<4} {tps:8.1f} tok/s", flush=True)
    return out


def summary(runs: list[float], base: list[float]) -> dict:
    """median: of the ratios within each repeat (the two loads ran minutes apart at most, so a drift in
    the machine's speed falls on both); best: best over best."""
    paired = [r / b for r, b in zip(runs, base, strict=True)]
    return {"median": statistics.median(paired), "best": max(runs) / max(base), "paired": paired,
            "tok_s_median": statistics.median(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loaded", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--high-rank-loaded", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--skip-batch-256", action="store_true")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()

    model_dir = default_model_dir()
    embedding = default_output_embedding(model_dir)
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), 256, args.prompt_tokens, 0)
    engine = [*CPU_SERVER_ARGS, "--max-num-seqs", "256", "--seed", "0"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    configs = [(n, 64) for n in args.loaded] + [(n, 576) for n in args.high_rank_loaded]
    data = {"machine": machine(), "args": vars(args), "configs": {}, "distinct": {}}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        plain = ServerProcess(plain_server_command(str(model_dir), *engine), scratch / "plain.log",
                              env={**env, "VLLM_PLUGINS": ""})
        data["plain_startup_s"] = timed_start(plain)
        try:
            for n, rank in configs:
                key = f"N{n}-r{rank}"
                names = make_folder(scratch / key, n, rank, embedding)
                server = ServerProcess(steer_server_command(str(model_dir), {}, "--steer-dir", str(scratch / key),
                                                            *engine), scratch / f"{key}.log", env=env)
                startup = timed_start(server)
                print(f"{key}: started in {startup:.1f} s", flush=True)
                try:
                    runs = bench({"plain": (plain, names, "unsteered"), key: (server, names, ",".join(WORKLOADS))},
                                 prompts, args, BATCH)
                    plain_runs = runs.pop("plain/unsteered")
                    base = runs[f"{key}/unsteered"]
                    data["configs"][key] = {
                        "loaded": n, "rank": rank, "startup_s": startup,
                        "runs": {**runs, "plain": plain_runs},
                        "vs_unsteered": {w: summary(runs[f"{key}/{w}"], base) for w in WORKLOADS},
                        "vs_plain": {w: summary(runs[f"{key}/{w}"], plain_runs) for w in WORKLOADS},
                    }
                    if (n, rank) == (max(args.loaded), 64):
                        shapes = [(BATCH, d) for d in args.distinct if d <= n]
                        if not args.skip_batch_256 and n >= 256:
                            shapes.append((256, 256))
                        for batch, d in shapes:
                            kinds = f"unsteered,own:{d}"
                            r = bench({key: (server, names, kinds)}, prompts, args, batch)
                            data["distinct"][f"b{batch}-d{d}"] = {
                                "batch": batch, "distinct": d,
                                "ratio": summary(r[f"{key}/own:{d}"], r[f"{key}/unsteered"])}
                finally:
                    server.stop()
                write_results(data, args.tag)  # after every configuration: a killed run keeps its results
        finally:
            plain.stop()
    write_results(data, args.tag)


def write_results(data: dict, tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"many_steers_{tag}.json").write_text(json.dumps(data, indent=2))
    m = data["machine"]
    lines = [f"# Many steers on one server ({tag})", "",
             f"Machine: {m['cpu']}, {m['cores']} threads; torch {m['torch']}, vLLM {m['vllm']}; {m['date']}. "
             f"Default model, float32, batch {BATCH}, {data['args']['prompt_tokens']}-token prompts, "
             f"{data['args']['output_tokens']} new tokens, {data['args']['repeats']} repeats (workloads interleaved, "
             "order rotated). Steers: K=2 (style + bias dim). Each cell: throughput ratio, the median of the "
             "ratios within each repeat / best over best.", "",
             "| loaded | rank | start-up s | own steer each / unsteered | all on one / unsteered | half unsteered "
             "/ unsteered | own steer each / plain vLLM | unsteered / plain vLLM |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in data["configs"].values():
        u, p = c["vs_unsteered"], c["vs_plain"]
        cell = lambda s: f"{s['median']:.3f} / {s['best']:.3f}"  # noqa: E731
        lines.append(f"| {c['loaded']} | {c['rank']} | {c['startup_s']:.0f} | {cell(u['own'])} | {cell(u['one'])} | "
                     f"{cell(u['half'])} | {cell(p['own'])} | {cell(p['unsteered'])} |")
    if data["distinct"]:
        lines += ["", "## Distinct steers in one batch (EasySteer's curve shape)", "",
                  "| batch | distinct steers | steered / unsteered (median / best) |", "|---:|---:|---:|"]
        for d in data["distinct"].values():
            lines.append(f"| {d['batch']} | {d['distinct']} | {d['ratio']['median']:.3f} / {d['ratio']['best']:.3f} |")
    lines += ["", f"Plain vLLM start-up: {data.get('plain_startup_s', float('nan')):.0f} s."]
    (RESULTS / f"many_steers_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for rank in sorted({c["rank"] for c in data["configs"].values()}):
            cs = sorted((c for c in data["configs"].values() if c["rank"] == rank), key=lambda c: c["loaded"])
            for w, label in [("own", "each request its own steer"), ("one", "all on one steer"),
                             ("half", "half unsteered")]:
                ax.plot([c["loaded"] for c in cs], [c["vs_unsteered"][w]["median"] for c in cs], marker="o",
                        ls="-" if rank == 64 else "--", label=f"rank {rank}: {label}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.97, color="red", lw=0.8, ls=":", label="0.97 target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steers loaded")
        ax.set_ylabel("throughput / same server unsteered (median)")
        ax.set_title(f"vllm-steer, batch {BATCH}, CPU")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / f"many_steers_{tag}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
