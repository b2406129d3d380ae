"""The per-row gather op alone on CPU: what one decode step pays for steering, as the number of
loaded steers grows and as the rows spread over more of them.

    .venv/bin/python benchmarks/gather_op_cpu.py [--threads 2] [--repeats 200] [--batch 64 256]

A `SteerBank` of N random steers (K=2, both dims on, rank 64, D=576: the default model's shape,
float32, packed as the plugin packs it on CPU), each row on its own steer (as many distinct as rows,
or all N when fewer) and all rows on one steer; the median time of `SteerBank.steer` over the
repeats. Writes benchmarks/results/gather_op_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from throughput import RESULTS, machine

from vllm_steer.kernels import steer_hidden_gather_torch
from vllm_steer.steer.bank import CPU_STORAGE, KERNEL_STORAGE, SteerBank
from vllm_steer.testing import random_steer

D, RANK = 576, 64


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
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.loaded:
        steers = {f"s{i}": random_steer([f"s{i}", "bias"], D, RANK, seed=i, sigma=0.45) for i in range(n)}
        bank = SteerBank.pack(steers, CPU_STORAGE)
        before = SteerBank.pack(steers, KERNEL_STORAGE)
        columns = before.down.t().contiguous().t()  # [D, C], each steer's columns one block
        for batch in args.batch:
            hidden = torch.randn(batch, D, generator=torch.Generator().manual_seed(0))
            values = torch.full((batch, 1, bank.max_dims), 1e-3)
            own = (torch.arange(batch) % n).to(torch.int32).unsqueeze(1)
            one = torch.zeros(batch, 1, dtype=torch.int32)
            none = torch.full((batch, 1), -1, dtype=torch.int32)
            row = {"loaded": n, "batch": batch, "distinct": min(n, batch),
                   "bank_mib": (bank.down.numel() + bank.up.numel()) * 4 / 2**20}
            for kind, rs in (("own", own), ("one", one), ("unsteered", none)):
                row[f"{kind}_ms"] = median_ms(partial(bank.steer, hidden, rs, values), args.repeats)
                if kind != "unsteered":
                    row[f"{kind}_before_ms"] = median_ms(partial(steer_hidden_gather_torch, hidden, columns, before.up,
                                                                 before.cols, rs, values), args.repeats)
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine(), "args": vars(args), "rows": rows}
    (RESULTS / "gather_op_cpu.json").write_text(json.dumps(data, indent=2))
    m = data["machine"]
    lines = ["# The gather op alone on CPU", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, {args.threads} threads; {m['date']}. `SteerBank.steer` on "
             f"[batch, {D}] float32, steers K=2 rank {RANK}; median of {args.repeats} calls.", "",
             "Before: the GEMM-per-steer op (`steer_hidden_gather_torch`) on the [D, C] layout with each steer's "
             "columns contiguous, the CPU path before the embedding bags.", "",
             "| loaded | bank MiB | batch | each row its own steer (distinct) ms | before ms | all on one steer ms "
             "| before ms | unsteered ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['loaded']} | {r['bank_mib']:.1f} | {r['batch']} | {r['own_ms']:.2f} ({r['distinct']}) | "
              f"{r['own_before_ms']:.2f} | {r['one_ms']:.2f} | {r['one_before_ms']:.2f} | {r['unsteered_ms']:.3f} |"
              for r in rows]
    (RESULTS / "gather_op_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
