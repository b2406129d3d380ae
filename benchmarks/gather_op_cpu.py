"""The per-row gather op alone on CPU: what one decode step pays for steering, as the number of
loaded steers grows and as the rows spread over more of them.

    .venv/bin/python benchmarks/gather_op_cpu.py [--threads 2] [--repeats 200]

A `SteerBank` of N random steers (K=2, rank 64, D=576: the default model's shape, float32, packed
as the plugin packs it on CPU), batch 64, each row on its own steer (64 distinct, or all N when
N < 64) and all rows on one steer; the median time of `SteerBank.steer` over the repeats. Writes
benchmarks/results/gather_op_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from throughput import RESULTS, machine

from vllm_steer.steer.formula import SteerBank
from vllm_steer.tools.random_steer import random_steer

BATCH, D, RANK = 64, 576, 64


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loaded", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(0))
    rows = []
    for n in args.loaded:
        bank = SteerBank.pack({f"s{i}": random_steer([f"s{i}", "bias"], D, RANK, seed=i, sigma=0.45)
                               for i in range(n)})
        values = torch.zeros(BATCH, 1, bank.max_dims)
        values[:, 0] = 1e-3
        own = (torch.arange(BATCH) % n).to(torch.int32).unsqueeze(1)
        one = torch.zeros(BATCH, 1, dtype=torch.int32)
        none = torch.full((BATCH, 1), -1, dtype=torch.int32)
        row = {"loaded": n, "distinct": min(n, BATCH), "bank_mib": bank.down.numel() * 8 / 2**20}
        for kind, steers in (("own", own), ("one", one), ("unsteered", none)):
            row[f"{kind}_ms"] = median_ms(lambda b=bank, s=steers, v=values: b.steer(hidden, s, v), args.repeats)
        rows.append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine(), "args": vars(args), "rows": rows}
    (RESULTS / "gather_op_cpu.json").write_text(json.dumps(data, indent=2))
    m = data["machine"]
    lines = ["# The gather op alone on CPU", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, {args.threads} threads; {m['date']}. `SteerBank.steer` on "
             f"[{BATCH}, {D}] float32, steers K=2 rank {RANK}; median of {args.repeats} calls.", "",
             "| loaded | bank MiB | each row its own steer (distinct) ms | all on one steer ms | unsteered ms |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['loaded']} | {r['bank_mib']:.1f} | {r['own_ms']:.2f} ({r['distinct']}) | {r['one_ms']:.2f} | "
              f"{r['unsteered_ms']:.3f} |" for r in rows]
    (RESULTS / "gather_op_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
