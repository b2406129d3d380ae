"""GPU micro-benchmark of the steer op, bf16: the Triton kernels (kernels/steer_triton.py) vs
the torch op (kernels/steer_torch.py) vs the LM-head GEMM alone (h @ E^T, E [V, D]), at model
shapes from 135M- to 8B-class, then a small sweep of launch configs around the heuristic one.

    python benchmarks/kernel_bench.py OUTDIR [--budget-s 150] [--sweep-budget-s 30] [--quick]

Needs only torch and Triton on a CUDA machine; imports `kernels` from this checkout. Times are
medians of triton.testing.do_bench (L2 flushed before every run, as at decode, where the LM
head runs in between). The memory floor is the bytes that must move: down and up read once,
h read once, the output written once (values and col_dim are noise), at the device's peak
bandwidth (by device name: H100 SXM 3.35 TB/s, H200 4.8 TB/s, ...; else from the memory clock
and bus width; else a measured copy). The shapes run in priority order (decode batches first)
and the run stops cleanly at the time budget. Writes OUTDIR/kernel_bench.{json,md}, updated
after every point so that a killed run still leaves its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kernels` from this checkout
from kernels import steer_triton  # noqa: E402
from kernels.steer_torch import steer_hidden_torch  # noqa: E402

# (name, D, V): SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B.
MODELS = [("135M", 576, 49152), ("1B", 2048, 128256), ("3B", 3072, 128256), ("8B", 4096, 128256)]
DIMS = [1, 2, 8]  # K: steer dims over all loaded steers (R = K * r)
BATCHES = [[1, 16], [64, 256]]  # two passes: decode batches first
WARMUP_MS, REP_MS = 10, 50
DEVICE = "cuda"

# Peak HBM bandwidth by device-name substring, most specific first (vendor datasheets).
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
           ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
           ("B200", 8.0e12)]


def bench(fn) -> float:
    """Median time in µs."""
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the practical ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (us * 1e-6)


def peak_bandwidth(name: str) -> tuple[float, str]:
    for key, bw in PEAK_BW:
        if key in name:
            return bw, f"datasheet ({key})"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width"
    return copy_bandwidth(), "measured copy (no datasheet value)"


def make_inputs(d: int, rank: int, k: int, b: int) -> tuple[torch.Tensor, ...]:
    r = rank * k
    h = torch.randn(b, d, device=DEVICE).bfloat16()
    down = (torch.randn(d, r, device=DEVICE) / d**0.5).bfloat16()
    up = (torch.randn(r, d, device=DEVICE) / r**0.5).bfloat16()
    col_dim = torch.arange(k, device=DEVICE).repeat_interleave(rank)
    values = torch.randn(b, k, device=DEVICE) * 1e-3  # every row steered (eps folded in)
    return h, down, up, col_dim, values


def bench_point(model: str, d: int, v: int, rank: int, k: int, b: int, lm_head: torch.Tensor, peak: float) -> dict:
    h, down, up, col_dim, values = make_inputs(d, rank, k, b)
    r = rank * k
    out = torch.empty_like(h)
    zeros = torch.zeros_like(values)
    kernel_us = bench(lambda: steer_triton.steer_hidden_triton(h, down, up, col_dim, values, out=out))
    unsteered_us = bench(lambda: steer_triton.steer_hidden_triton(h, down, up, col_dim, zeros, out=out))
    torch_us = bench(lambda: steer_hidden_torch(h, down, up, col_dim, values))
    head_us = bench(lambda: h @ lm_head.T)
    ref = steer_hidden_torch(h, down, up, col_dim, values).float()
    got = steer_triton.steer_hidden_triton(h, down, up, col_dim, values).float()
    floor_bytes = 2 * d * r * down.element_size() + 2 * b * d * h.element_size()
    floor_us = floor_bytes / peak * 1e6
    cfg = steer_triton._pick_config(b, d, r, steer_triton._num_sms(torch.cuda.current_device()))
    return {"model": model, "D": d, "V": v, "rank": rank, "K": k, "R": r, "batch": b,
            "kernel_us": kernel_us, "kernel_unsteered_us": unsteered_us, "torch_us": torch_us, "lm_head_us": head_us,
            "floor_bytes": floor_bytes, "floor_us": floor_us, "x_floor": kernel_us / floor_us,
            "achieved_GBps": floor_bytes / (kernel_us * 1e-6) / 1e9, "pct_peak_bw": 100 * floor_us / kernel_us,
            "speedup_vs_torch": torch_us / kernel_us, "pct_of_lm_head": 100 * kernel_us / head_us,
            "max_abs_diff_vs_torch": (got - ref).abs().max().item(), "config": dataclasses.asdict(cfg)}


# One parameter at a time around the heuristic config.
AXES = {"split_k": [1, 2, 4, 8], "block_d": [16, 32, 64, 128], "expand_block_r": [64, 128, 256],
        "shrink_block_r": [32, 64, 128], "block_k": [64, 128, 256], "num_stages": [2, 3, 4, 5], "num_warps": [2, 4, 8]}
SWEEP_SHAPES = [(4096, 4096, 2, 1), (4096, 4096, 2, 16), (2048, 2048, 2, 1), (4096, 64, 2, 1), (576, 576, 2, 1),
                (4096, 4096, 8, 1), (4096, 4096, 2, 256)]  # (D, rank, K, B)


def sweep(budget_s: float, peak: float, log) -> list[dict]:
    """Time configs around the heuristic one: data to retune _pick_config on this GPU."""
    t0, rows = time.monotonic(), []
    for d, rank, k, b in SWEEP_SHAPES:
        h, down, up, col_dim, values = make_inputs(d, rank, k, b)
        r = rank * k
        base = steer_triton._pick_config(b, d, r, steer_triton._num_sms(torch.cuda.current_device()))
        variants = [base] + [dataclasses.replace(base, **{f: x}) for f, xs in AXES.items() for x in xs
                             if x != getattr(base, f)]
        expected = steer_hidden_torch(h, down, up, col_dim, values).float()
        floor_us = (2 * d * r * 2 + 2 * b * d * 2) / peak * 1e6
        results = []
        for cfg in variants:
            if time.monotonic() - t0 > budget_s:
                break
            out = torch.empty_like(h)
            try:
                steer_triton._launch(h, down, up, col_dim, values, out, cfg)
                err = (out.float() - expected).abs().max().item()
                args = (h, down, up, col_dim, values, out, cfg)
                us = bench(lambda args=args: steer_triton._launch(*args))
                results.append({"config": dataclasses.asdict(cfg), "us": us, "x_floor": us / floor_us,
                                "max_abs_diff_vs_torch": err, "heuristic": cfg == base})
            except Exception as exc:  # an invalid tile combination for this GPU: record and go on
                results.append({"config": dataclasses.asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:300]})
        timed = [x for x in results if "us" in x]
        if timed:
            best = min(timed, key=lambda x: x["us"])
            heur = next((x for x in timed if x["heuristic"]), None)
            rows.append({"D": d, "rank": rank, "K": k, "R": r, "batch": b, "floor_us": floor_us,
                         "heuristic_us": heur["us"] if heur else None, "best_us": best["us"],
                         "best_config": best["config"], "variants": results})
            log(f"sweep D={d} R={r} B={b}: heuristic {rows[-1]['heuristic_us']:.1f} us, best {best['us']:.1f} us "
                f"({best['config']}), {len(timed)} configs")
        if time.monotonic() - t0 > budget_s:
            log(f"sweep budget ({budget_s:.0f} s) spent")
            break
    return rows


def write(outdir: Path, meta: dict, rows: list[dict], sweep_rows: list[dict]) -> None:
    (outdir / "kernel_bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep_rows}, indent=1))
    lines = [f"# Steer op micro-benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}. "
             f"bf16 hidden state and weights; medians of triton.testing.do_bench with the L2 flushed.", "",
             f"Floor: bytes of down + up + h read + output written, at the peak bandwidth "
             f"{meta['peak_bw_GBps']:.0f} GB/s ({meta['peak_bw_source']}). Measured 1 GiB copy: "
             f"{meta['copy_bw_GBps']:.0f} GB/s. 'unsteered': the same launch with every row's values zero.", "",
             "| model | D | V | r | K | R | B | kernel µs | unsteered µs | floor µs | x floor | GB/s | % peak BW "
             "| torch op µs | kernel speed-up | LM head µs | kernel % of LM head |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['model']} | {x['D']} | {x['V']} | {x['rank']} | {x['K']} | {x['R']} | {x['batch']} | "
                     f"{x['kernel_us']:.1f} | {x['kernel_unsteered_us']:.1f} | {x['floor_us']:.1f} | "
                     f"{x['x_floor']:.2f} | {x['achieved_GBps']:.0f} | {x['pct_peak_bw']:.0f} | {x['torch_us']:.1f} | "
                     f"{x['speedup_vs_torch']:.1f}x | {x['lm_head_us']:.1f} | {x['pct_of_lm_head']:.1f} |")
    if meta.get("skipped"):
        lines += ["", f"Not run (time budget): {len(meta['skipped'])} points, see the JSON."]
    if sweep_rows:
        lines += ["", "## Config sweep (one parameter at a time around the heuristic config)", "",
                  "| D | R | B | floor µs | heuristic µs | best µs | best config |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for s in sweep_rows:
            heur = f"{s['heuristic_us']:.1f}" if s["heuristic_us"] is not None else "-"
            cfg = ", ".join(f"{k}={v}" for k, v in s["best_config"].items())
            lines.append(f"| {s['D']} | {s['R']} | {s['batch']} | {s['floor_us']:.1f} | {heur} | "
                         f"{s['best_us']:.1f} | {cfg} |")
    (outdir / "kernel_bench.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new grid points after this")
    parser.add_argument("--sweep-budget-s", type=float, default=30.0, help="time for the config sweep (0: none)")
    parser.add_argument("--quick", action="store_true", help="one rank (r = D) and K in {1, 2} only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench.py needs a CUDA device", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0)
    peak, source = peak_bandwidth(name)
    meta = {"device": name, "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": "bfloat16", "peak_bw_GBps": peak / 1e9, "peak_bw_source": source,
            "copy_bw_GBps": copy_bandwidth() / 1e9, "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS},
            "skipped": []}
    log(f"{name}: peak {peak / 1e9:.0f} GB/s ({source}), copy {meta['copy_bw_GBps']:.0f} GB/s")
    rows: list[dict] = []
    heads: dict[str, torch.Tensor] = {}
    for batches in BATCHES:
        for model, d, v in MODELS:
            for rank in ([d] if args.quick else sorted({64, d})):
                for k in (DIMS[:2] if args.quick else DIMS):
                    for b in batches:
                        point = {"model": model, "D": d, "rank": rank, "K": k, "batch": b}
                        if time.monotonic() - t0 > args.budget_s:
                            meta["skipped"].append(point)
                            continue
                        if model not in heads:
                            heads.clear()
                            torch.cuda.empty_cache()
                            heads[model] = (torch.randn(v, d, device=DEVICE) * d**-0.5).bfloat16()
                        row = bench_point(model, d, v, rank, k, b, heads[model], peak)
                        rows.append(row)
                        log(f"{model:>5} r={rank:<5} K={k} B={b:<4} kernel {row['kernel_us']:8.1f} us "
                            f"(x{row['x_floor']:.2f} floor, {row['pct_of_lm_head']:5.1f}% of LM head, "
                            f"unsteered {row['kernel_unsteered_us']:.1f}) torch {row['torch_us']:8.1f} "
                            f"head {row['lm_head_us']:8.1f}")
                        write(args.outdir, meta, rows, [])
    heads.clear()
    torch.cuda.empty_cache()
    if meta["skipped"]:
        log(f"time budget spent: {len(meta['skipped'])} grid points not run")
    sweep_rows = sweep(args.sweep_budget_s, peak, log) if args.sweep_budget_s > 0 else []
    write(args.outdir, meta, rows, sweep_rows)
    log(f"wrote {args.outdir / 'kernel_bench.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
