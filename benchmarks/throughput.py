"""End-to-end decode throughput: vLLM without the plugin vs the plugin unsteered, every request
steered with its own values, and every request composing two steers; and the same load
against the reference approach (HF transformers `generate`, one steer vector per batch).

    .venv/bin/python benchmarks/throughput.py [--batch-sizes 1 8 32 64 128] [--repeats 3]

Writes benchmarks/results/throughput_<device>.{json,md,png}. The load generator is the
official `openai` client: `bs` concurrent completions, each a distinct prompt of exactly
`--prompt-tokens` tokens and exactly `--output-tokens` new tokens (ignore_eos)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import openai
import torch

from vllm_steer import SteerFile
from vllm_steer.steer.formula import steered_hidden
from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, plain_server_command, random_steer, steer_server_command
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("river market window silver garden engine letter mountain story yellow winter paper station "
         "quiet doctor island morning bridge forest candle music teacher orange bottle summer").split()


def machine() -> dict:
    import transformers
    import vllm

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True)
    return {"cpu": cpu.stdout.strip(), "cores": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat()}


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens (distinct, so prefix caching cannot
    skip their prefill)."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(length * 2)))["input_ids"][:length]
        prompts.append(ids)
    return prompts


def make_steers(model_dir: Path, folder: Path) -> dict[str, str]:
    """Two random steers shaped like the reference's (K=2: style + bias dim, rank = D)."""
    emb = default_output_embedding(model_dir)
    paths = {}
    for i, name in enumerate(["first", "second"]):
        paths[name] = str(folder / f"{name}.safetensors")
        random_steer([name, "bias"], emb.shape[1], emb.shape[1], seed=i, sigma=0.1, embedding=emb,
                     bias_dims={"bias": 1.0}).save(paths[name])
    return paths


def workload_xargs(kind: str, n: int) -> list[dict | None]:
    """Per-request values: distinct per request, as a real mixed batch would have."""
    if kind in ("plain", "unsteered"):
        return [None] * n
    values = [round(-5 + 10 * i / max(n - 1, 1), 3) for i in range(n)]
    if kind == "steered":
        return [{"steer_first": v} for v in values]
    return [{"steer_first": v, "steer_second": -v / 2} for v in values]


async def run_load(url: str, prompts: list[list[int]], xargs: list[dict | None], output_tokens: int) -> float:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id

    async def one(prompt, x):
        body = {"ignore_eos": True, **({"vllm_xargs": x} if x else {})}
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=output_tokens, temperature=0,
                                            extra_body=body)
        return r.usage.completion_tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p, x) for p, x in zip(prompts, xargs, strict=True))))
    elapsed = time.perf_counter() - start
    await client.close()
    return tokens / elapsed


def bench_servers(servers: dict[str, ServerProcess], args, prompts) -> dict:
    """tokens/s per kind and batch size. Both servers stay up and the kinds take turns within
    every repeat, so drifts in machine load fall on all of them alike."""
    for server in set(servers.values()):
        warm = prompts[:8]
        asyncio.run(run_load(server.url, warm, [None] * len(warm), 8))  # warm-up
    out = {k: {bs: [] for bs in args.batch_sizes} for k in servers}
    kinds = list(servers)
    for repeat in range(args.repeats):
        for i, bs in enumerate(args.batch_sizes):
            shift = (repeat + i) % len(kinds)  # rotate the order: no kind always runs first
            for kind in kinds[shift:] + kinds[:shift]:
                server = servers[kind]
                tps = asyncio.run(run_load(server.url, prompts[:bs], workload_xargs(kind, bs), args.output_tokens))
                out[kind][bs].append(tps)
                print(f"  {kind:>10} bs={bs:<4} {tps:8.1f} tok/s", flush=True)
    return out


def bench_reference(model_dir: Path, steer_path: str, prompts: list[list[int]], output_tokens: int,
                    repeats: int, batch: int) -> dict:
    """HF transformers generate with the steer applied the reference's way: one steer vector
    for the whole batch, on the LM head's input. (i) one shared value: one batch;
    (ii) a value per request: one generate call per distinct value."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    steer = SteerFile.load(steer_path)
    head = model.get_output_embeddings()
    eps, p1, p2 = steer.header.epsilon, steer.projector1.float(), steer.projector2.float()
    state = {"s": torch.zeros(steer.header.num_dims)}

    class ReferenceSteeredHead(torch.nn.Module):
        def forward(self, h):
            return torch.nn.functional.linear(steered_hidden(h, state["s"][None], p1, p2, eps), head.weight)

    model.lm_head = ReferenceSteeredHead()
    ids = torch.tensor(prompts[:batch])

    def generate(rows: torch.Tensor) -> int:
        with torch.no_grad():
            out = model.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=output_tokens,
                                 min_new_tokens=output_tokens, do_sample=False, pad_token_id=0)
        return (out.shape[1] - rows.shape[1]) * rows.shape[0]

    values = [round(-5 + 10 * i / max(batch - 1, 1), 3) for i in range(batch)]
    result = {"shared_value": [], "distinct_values": []}
    generate(ids[:2])  # warm-up
    for _ in range(repeats):
        state["s"] = torch.tensor([5.0, 1.0])
        start = time.perf_counter()
        tokens = generate(ids)
        result["shared_value"].append(tokens / (time.perf_counter() - start))
        start, tokens = time.perf_counter(), 0
        for i, v in enumerate(values):
            state["s"] = torch.tensor([v, 1.0])
            tokens += generate(ids[i:i + 1])
        result["distinct_values"].append(tokens / (time.perf_counter() - start))
        print(f"  reference bs={batch}: shared {result['shared_value'][-1]:.1f}, "
              f"distinct {result['distinct_values'][-1]:.1f} tok/s", flush=True)
    return result


def write_results(data: dict, tag: str) -> None:
    """JSON, a markdown table and a plot. Both the median and the best of the repeats are
    shown: on a shared machine a repeat that overlaps another job's burst runs at about half
    speed, and the best repeat is the closest to the machine's quiet speed."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"throughput_{tag}.json").write_text(json.dumps(data, indent=2))
    runs = {k: {int(bs): v for bs, v in per.items()} for k, per in data["vllm"].items()}
    med = {k: {bs: statistics.median(v) for bs, v in per.items()} for k, per in runs.items()}
    best = {k: {bs: max(v) for bs, v in per.items()} for k, per in runs.items()}
    m = data["machine"]
    lines = [f"# End-to-end throughput ({tag})", "",
             f"Machine: {m['cpu']}, {m['cores']} threads; torch {m['torch']}, vLLM {m['vllm']}; {m['date']}. "
             f"Default model (SmolLM2-135M-Instruct), float32, {data['args']['prompt_tokens']}-token prompts, "
             f"{data['args']['output_tokens']} new tokens, {data['args']['repeats']} repeats (kinds interleaved, "
             "order rotated). Steers: 2 x (K=2, r=D=576). Each cell: tok/s and ratio to (a), "
             "as median / best of the repeats.", "",
             "| batch | (a) vLLM tok/s | (b) plugin, unsteered | (c) each steered | (d) each composes 2 |",
             "|---:|---:|---:|---:|---:|"]
    for bs in sorted(med["plain"]):
        cells = [f"{med[k][bs]:.0f} ({med[k][bs] / med['plain'][bs]:.3f}) / {best[k][bs]:.0f} "
                 f"({best[k][bs] / best['plain'][bs]:.3f})" for k in ("unsteered", "steered", "composed")]
        lines.append(f"| {bs} | {med['plain'][bs]:.0f} / {best['plain'][bs]:.0f} | " + " | ".join(cells) + " |")
    ref = data.get("reference")
    if ref:
        bs = ref["batch"]
        lines += ["", f"## Against the reference approach (HF `generate`, one steer vector per batch), batch {bs}", "",
                  "Median / best of the repeats; vllm-steer's figure is workload (c) at the same batch.", "",
                  "| workload | reference tok/s | vllm-steer tok/s | speed-up |", "|---|---:|---:|---:|"]
        for key, label in [("shared_value", "(i) all share one value (one batch)"),
                           ("distinct_values", "(ii) each its own value (one call per value)")]:
            r_med, r_best = statistics.median(ref[key]), max(ref[key])
            o_med, o_best = med["steered"][bs], best["steered"][bs]
            lines.append(f"| {label} | {r_med:.1f} / {r_best:.1f} | {o_med:.0f} / {o_best:.0f} | "
                         f"{o_med / r_med:.2f}x / {o_best / r_best:.2f}x |")
    (RESULTS / f"throughput_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        sizes = sorted(med["plain"])
        for kind, label in [("unsteered", "(b) plugin, unsteered"), ("steered", "(c) each steered"),
                            ("composed", "(d) each composes 2")]:
            line = ax.plot(sizes, [best[kind][bs] / best["plain"][bs] for bs in sizes], marker="o",
                           label=f"{label}, best")[0]
            ax.plot(sizes, [med[kind][bs] / med["plain"][bs] for bs in sizes], ls=":", color=line.get_color(),
                    label=f"{label}, median")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.97, color="red", lw=0.8, ls="--", label="97% target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("throughput / vLLM without plugin")
        ax.set_title(f"vllm-steer throughput ratio ({tag})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / f"throughput_{tag}.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--reference-batch", type=int, default=32)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), max(args.batch_sizes), args.prompt_tokens, 0)
    engine = [*CPU_SERVER_ARGS, "--max-num-seqs", str(max(args.batch_sizes)), "--seed", "0"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    with tempfile.TemporaryDirectory() as scratch:
        steers = make_steers(model_dir, Path(scratch))
        plain = ServerProcess(plain_server_command(str(model_dir), *engine), Path(scratch) / "plain.log",
                              env={**env, "VLLM_PLUGINS": ""})
        steered = ServerProcess(steer_server_command(str(model_dir), steers, *engine), Path(scratch) / "steer.log",
                                env=env)
        with plain, steered:
            print("(a) vLLM without the plugin vs (b, c, d) with vllm-steer, interleaved", flush=True)
            results = bench_servers({"plain": plain, "unsteered": steered, "steered": steered,
                                     "composed": steered}, args, prompts)
        data = {"machine": machine(), "args": vars(args), "vllm": results}
        if not args.skip_reference:
            print("reference approach (HF transformers generate)", flush=True)
            data["reference"] = {"batch": args.reference_batch, **bench_reference(
                model_dir, steers["first"], prompts, args.output_tokens, args.repeats, args.reference_batch)}
    write_results(data, args.tag)


if __name__ == "__main__":
    main()
