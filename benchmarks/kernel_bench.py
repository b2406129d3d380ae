"""GPU micro-benchmark of the steer op: the Triton kernels vs the torch op vs the LM-head GEMM
alone, at model shapes from 135M to 8B-class, bf16. Needs only torch and Triton (runs from a
raw checkout: the repo root goes on sys.path).

    python benchmarks/kernel_bench.py OUTDIR [--quick]

Times are medians from triton.testing.do_bench. The memory floor is the bytes that must move:
P1 and P2 (down, up), h read and h' written, the per-row values; achieved bandwidth is that over
the measured time, against the copy bandwidth measured in the same run."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.steer_torch import steer_hidden_torch  # noqa: E402
from kernels.steer_triton import steer_hidden_triton  # noqa: E402

# (name, D, V): SmolLM2-135M, GPT2-large (the paper's), Llama-3.2-1B, Llama-3-8B.
MODELS = [("135M", 576, 49152), ("gpt2-large", 1280, 50257), ("1B", 2048, 128256), ("8B", 4096, 128256)]
BATCHES = [1, 16, 64, 256]
DIMS = [1, 2, 8]  # K_total: steer dims over all loaded steers


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write): the practical ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def bench_one(d: int, v: int, rank: int, k: int, b: int, lm_head: torch.Tensor) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    r_total = rank * k
    h = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, generator=g)
    down = (torch.randn(d, r_total, device="cuda", generator=g) / d**0.5).bfloat16()
    up = (torch.randn(r_total, d, device="cuda", generator=g) / r_total**0.5).bfloat16()
    col_dim = torch.arange(k, device="cuda").repeat_interleave(rank)
    values = torch.randn(b, k, device="cuda", generator=g)
    out = torch.empty_like(h)
    t_kernel = do_bench(lambda: steer_hidden_triton(h, down, up, col_dim, values, out=out))
    t_torch = do_bench(lambda: steer_hidden_torch(h, down, up, col_dim, values))
    t_head = do_bench(lambda: h @ lm_head.T)
    floor_bytes = 2 * d * r_total * 2 + 2 * b * d * 2 + b * k * 4
    return {"D": d, "V": v, "rank": rank, "K": k, "R": r_total, "batch": b, "kernel_us": t_kernel * 1e3,
            "torch_us": t_torch * 1e3, "lm_head_us": t_head * 1e3, "floor_bytes": floor_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    ceiling = copy_bandwidth()
    rows = []
    for name, d, v in MODELS:
        lm_head = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
        for rank in sorted({64, d}):
            for k in DIMS[:2] if args.quick else DIMS:
                for b in BATCHES:
                    row = {"model": name, **bench_one(d, v, rank, k, b, lm_head)}
                    row["achieved_GBps"] = row["floor_bytes"] / (row["kernel_us"] * 1e-6) / 1e9
                    row["floor_us"] = row["floor_bytes"] / ceiling * 1e6
                    row["x_floor"] = row["kernel_us"] / row["floor_us"]
                    row["pct_of_lm_head"] = 100 * row["kernel_us"] / row["lm_head_us"]
                    rows.append(row)
                    print(f"{name:>10} r={rank:<5} K={k} B={b:<4} kernel {row['kernel_us']:8.1f} us "
                          f"(x{row['x_floor']:.2f} floor, {row['pct_of_lm_head']:5.1f}% of LM head) "
                          f"torch {row['torch_us']:8.1f} us  head {row['lm_head_us']:8.1f} us", flush=True)
        del lm_head
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth_GBps": ceiling / 1e9, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "dtype": "bfloat16 hidden state and weights"}
    (args.outdir / "kernel_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Steer kernel micro-benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, {meta['date']}; bf16; medians of "
             f"triton.testing.do_bench. Floor = bytes of P1+P2, h in/out and values at the measured copy "
             f"bandwidth ({meta['copy_bandwidth_GBps']:.0f} GB/s).", "",
             "| model | D | V | r | K | batch | kernel us | x floor | GB/s | torch op us | LM head us "
             "| kernel % of head |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['D']} | {r['V']} | {r['rank']} | {r['K']} | {r['batch']} | "
                     f"{r['kernel_us']:.1f} | {r['x_floor']:.2f} | {r['achieved_GBps']:.0f} | {r['torch_us']:.1f} | "
                     f"{r['lm_head_us']:.1f} | {r['pct_of_lm_head']:.1f} |")
    (args.outdir / "kernel_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
