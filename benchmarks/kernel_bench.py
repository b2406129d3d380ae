"""GPU micro-benchmark of the steer op, bf16: the Triton kernels (vllm_steer.kernels.steer_triton)
vs the torch op vs the LM-head GEMM alone (h @ E^T, E [V, D]), then a sweep of launch configs
around the heuristic's, to retune `_pick_config` on the GPU.

    python benchmarks/kernel_bench.py OUTDIR [--budget-s 120] [--sweep-budget-s 40]

Needs torch and Triton on a CUDA machine and `vllm_steer.kernels` importable (installed, or the
symlinked layout benchmarks/gpu_check.sh builds from a raw checkout).

Timing: every op is captured once in a CUDA graph (as vLLM runs decode) and each repeat replays
it after a 256 MB write that flushes L2 (at decode the LM head's weights pass through L2 between
two steps), between CUDA events; the median of REPEATS. "eager µs" is triton.testing.do_bench of
the plain Python call (host launch overhead included), for comparison.

Floor: the bytes that must move (down and up read once, h read once, the output written once;
values and col_dim are noise) at the device's peak bandwidth (by device name: H100 SXM
3.35 TB/s, H200 4.8 TB/s, ...; else from the memory clock and bus width; else a measured copy).

Order: pass 1 is the targets (D = 4096, R 64..4096, batch <= 64: x floor <= 1.5, under 5% of the
LM head's time), pass 2 other models and larger batches, then the sweep; the run stops starting
points at the time budget. OUTDIR/kernel_bench.{json,md} are rewritten after every point, so a
killed run keeps what it measured; OUTDIR/kernel_bench_summary.md is the targets table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from vllm_steer.kernels import steer_triton
from vllm_steer.kernels.steer_torch import steer_hidden_torch

DEVICE = "cuda"
REPEATS = 40
FLUSH_BYTES = 256 << 20
K = 2  # steer dims (R = K * rank)
# Pass 1, the targets: D = 4096 (Llama-3.1-8B's hidden size, V = 128256).
TARGET_MODEL = ("8B", 4096, 128256)
TARGET_R = [64, 256, 1024, 4096]
TARGET_B = [1, 4, 16, 64]
# Pass 2: SmolLM2-135M, Llama-3.2-1B/3B and the 8B at r = 64 and r = D, batches 1..256.
MODELS = [("135M", 576, 49152), ("1B", 2048, 128256), ("3B", 3072, 128256), TARGET_MODEL]
MORE_B = [1, 16, 64, 256]
X_FLOOR_TARGET = 1.5
LM_HEAD_SHARE_TARGET = 5.0  # percent

# Peak HBM bandwidth by device-name substring, most specific first (vendor datasheets).
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
           ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
           ("B200", 8.0e12)]


def graph_time_us(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """Median µs of fn replayed from a CUDA graph, L2 flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and allocate outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(REPEATS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(REPEATS)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def eager_time_us(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the practical ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = eager_time_us(lambda: dst.copy_(src))
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


def make_inputs(d: int, r: int, b: int) -> tuple[torch.Tensor, ...]:
    """hidden [b, d], down [d, r], up [r, d] (bf16), col_dim [r] (K dims of r / K columns), values
    [b, K] fp32, every row steered."""
    h = torch.randn(b, d, device=DEVICE).bfloat16()
    down = (torch.randn(d, r, device=DEVICE) / d**0.5).bfloat16()
    up = (torch.randn(r, d, device=DEVICE) / r**0.5).bfloat16()
    col_dim = torch.arange(K, device=DEVICE).repeat_interleave(triton.cdiv(r, K))[:r]
    values = torch.randn(b, K, device=DEVICE) * 1e-3
    return h, down, up, col_dim, values


def floor_bytes(d: int, r: int, b: int) -> int:
    return 2 * d * r * 2 + 2 * b * d * 2


def bench_point(model: str, d: int, v: int, r: int, b: int, lm_head: torch.Tensor, peak: float,
                flush: torch.Tensor) -> dict:
    h, down, up, col_dim, values = make_inputs(d, r, b)
    out = torch.empty_like(h)
    zeros = torch.zeros_like(values)
    kernel_us = graph_time_us(lambda: steer_triton.steer_hidden_triton(h, down, up, col_dim, values, out=out), flush)
    unsteered_us = graph_time_us(lambda: steer_triton.steer_hidden_triton(h, down, up, col_dim, zeros, out=out), flush)
    eager_us = eager_time_us(lambda: steer_triton.steer_hidden_triton(h, down, up, col_dim, values, out=out))
    torch_us = graph_time_us(lambda: steer_hidden_torch(h, down, up, col_dim, values), flush)
    head_us = graph_time_us(lambda: h @ lm_head.T, flush)
    ref = steer_hidden_torch(h, down, up, col_dim, values).float()
    got = steer_triton.steer_hidden_triton(h, down, up, col_dim, values).float()
    floor_us = floor_bytes(d, r, b) / peak * 1e6
    target = steer_triton._device_target(torch.cuda.current_device())
    cfg = steer_triton._pick_config(b, d, r, target)
    launches = steer_triton._plan(h, down, up, col_dim, values, out, cfg, target, False)
    return {"model": model, "D": d, "V": v, "R": r, "K": K, "batch": b,
            "kernel_us": kernel_us, "kernel_unsteered_us": unsteered_us, "kernel_eager_us": eager_us,
            "torch_us": torch_us, "lm_head_us": head_us, "floor_bytes": floor_bytes(d, r, b), "floor_us": floor_us,
            "x_floor": kernel_us / floor_us, "achieved_GBps": floor_bytes(d, r, b) / (kernel_us * 1e-6) / 1e9,
            "speedup_vs_torch": torch_us / kernel_us, "pct_of_lm_head": 100 * kernel_us / head_us,
            "max_abs_diff_vs_torch": (got - ref).abs().max().item(), "config": dataclasses.asdict(cfg),
            "launches": [{"kernel": x.kernel.__name__, "grid": list(x.grid),
                          "num_warps": x.kwargs["num_warps"], "num_stages": x.kwargs["num_stages"]} for x in launches]}


# One parameter at a time around the heuristic config (explicit stage counts are used as given:
# a config that does not fit is refused by Triton and recorded as an error).
AXES = {"split_k": [1, 2, 4, 8], "block_d": [32, 64, 128, 256], "expand_block_r": [32, 64, 128],
        "split_r": [1, 2, 4, 8, 16], "shrink_block_r": [16, 32, 64, 128], "block_k": [64, 128, 256],
        "shrink_stages": [3, 4, 5, 6, 8], "expand_stages": [3, 4, 5, 6, 8], "shrink_warps": [2, 4, 8],
        "expand_warps": [2, 4, 8]}
SWEEP_SHAPES = [(4096, 4096, 1), (4096, 4096, 16), (4096, 1024, 1), (4096, 64, 1), (4096, 4096, 64),
                (2048, 2048, 1), (576, 576, 1)]  # (D, R, B)


def sweep(budget_s: float, peak: float, flush: torch.Tensor, log, save) -> list[dict]:
    """Time configs around the heuristic one: data to retune _pick_config on this GPU."""
    t0, rows = time.monotonic(), []
    target = steer_triton._device_target(torch.cuda.current_device())
    for d, r, b in SWEEP_SHAPES:
        h, down, up, col_dim, values = make_inputs(d, r, b)
        base = steer_triton._pick_config(b, d, r, target)
        variants = [base] + [dataclasses.replace(base, **{f: x}) for f, xs in AXES.items() for x in xs
                             if x != getattr(base, f)]
        expected = steer_hidden_torch(h, down, up, col_dim, values).float()
        floor_us = floor_bytes(d, r, b) / peak * 1e6
        results = []
        for cfg in variants:
            if time.monotonic() - t0 > budget_s:
                break
            out = torch.empty_like(h)
            try:
                steer_triton._launch(h, down, up, col_dim, values, out, cfg)
                err = (out.float() - expected).abs().max().item()
                args = (h, down, up, col_dim, values, out, cfg)
                us = graph_time_us(lambda args=args: steer_triton._launch(*args), flush)
                results.append({"config": dataclasses.asdict(cfg), "us": us, "x_floor": us / floor_us,
                                "max_abs_diff_vs_torch": err, "heuristic": cfg == base})
            except Exception as exc:  # a config that does not fit this GPU: record and go on
                results.append({"config": dataclasses.asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:300]})
        timed = [x for x in results if "us" in x]
        if timed:
            best = min(timed, key=lambda x: x["us"])
            heur = next((x for x in timed if x["heuristic"]), None)
            rows.append({"D": d, "R": r, "batch": b, "floor_us": floor_us,
                         "heuristic_us": heur["us"] if heur else None, "best_us": best["us"],
                         "best_config": best["config"], "variants": results})
            log(f"sweep D={d} R={r} B={b}: heuristic {rows[-1]['heuristic_us']:.1f} us, best {best['us']:.1f} us "
                f"({best['config']}), {len(timed)} configs")
            save(rows)
        if time.monotonic() - t0 > budget_s:
            log(f"sweep budget ({budget_s:.0f} s) spent")
            break
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """The targets: D = 4096, R <= 4096, batch <= 64."""
    lines = [f"## Against the targets (D = 4096, R 64..4096, batch <= 64; x floor <= {X_FLOOR_TARGET}, "
             f"< {LM_HEAD_SHARE_TARGET:.0f}% of the LM head)", "",
             "| R | B | kernel µs | floor µs | x floor | | LM head µs | % of LM head | |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    hits = [x for x in rows if x["D"] == 4096 and x["R"] <= 4096 and x["batch"] <= 64]
    for x in sorted(hits, key=lambda x: (x["R"], x["batch"])):
        ok_floor = "met" if x["x_floor"] <= X_FLOOR_TARGET else "missed"
        ok_head = "met" if x["pct_of_lm_head"] < LM_HEAD_SHARE_TARGET else "missed"
        lines.append(f"| {x['R']} | {x['batch']} | {x['kernel_us']:.1f} | {x['floor_us']:.2f} | {x['x_floor']:.2f} | "
                     f"{ok_floor} | {x['lm_head_us']:.1f} | {x['pct_of_lm_head']:.2f} | {ok_head} |")
    if not hits:
        lines.append("| - | - | no target point was measured | | | | | | |")
    return lines


def write(outdir: Path, meta: dict, rows: list[dict], sweep_rows: list[dict]) -> None:
    (outdir / "kernel_bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep_rows}, indent=1))
    lines = [f"# Steer op micro-benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}. bf16 hidden "
             f"state and weights, K = {K}. Times: medians of {REPEATS} CUDA-graph replays, L2 flushed before each; "
             f"'eager': do_bench of the Python call (host launch overhead included).", "",
             f"Floor: bytes of down + up + h read + output written, at the peak bandwidth "
             f"{meta['peak_bw_GBps']:.0f} GB/s ({meta['peak_bw_source']}). Measured 1 GiB copy: "
             f"{meta['copy_bw_GBps']:.0f} GB/s. 'unsteered': the same launch with every row's values zero. "
             f"Warm-up (compiling every variant for batches 1..256, per R): {meta.get('warm_up', {})}.", "",
             *summary_lines(rows), "",
             "## All points", "",
             "| model | D | V | R | B | kernel µs | unsteered µs | eager µs | floor µs | x floor | GB/s | torch op µs "
             "| speed-up | LM head µs | % of LM head | launches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in rows:
        grids = " + ".join(f"{y['kernel'].strip('_').split('_')[0]}{y['grid']}" for y in x["launches"])
        lines.append(f"| {x['model']} | {x['D']} | {x['V']} | {x['R']} | {x['batch']} | {x['kernel_us']:.1f} | "
                     f"{x['kernel_unsteered_us']:.1f} | {x['kernel_eager_us']:.1f} | {x['floor_us']:.2f} | "
                     f"{x['x_floor']:.2f} | {x['achieved_GBps']:.0f} | {x['torch_us']:.1f} | "
                     f"{x['speedup_vs_torch']:.1f}x | {x['lm_head_us']:.1f} | {x['pct_of_lm_head']:.2f} | {grids} |")
    if meta.get("skipped"):
        lines += ["", f"Not run (time budget): {len(meta['skipped'])} points, see the JSON."]
    if sweep_rows:
        lines += ["", "## Config sweep (one parameter at a time around the heuristic config)", "",
                  "| D | R | B | floor µs | heuristic µs | best µs | best config |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for s in sweep_rows:
            heur = f"{s['heuristic_us']:.1f}" if s["heuristic_us"] is not None else "-"
            cfg = ", ".join(f"{k}={v}" for k, v in s["best_config"].items())
            lines.append(f"| {s['D']} | {s['R']} | {s['batch']} | {s['floor_us']:.2f} | {heur} | "
                         f"{s['best_us']:.1f} | {cfg} |")
    (outdir / "kernel_bench.md").write_text("\n".join(lines) + "\n")
    (outdir / "kernel_bench_summary.md").write_text("\n".join(summary_lines(rows)) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop starting new grid points after this")
    parser.add_argument("--sweep-budget-s", type=float, default=40.0, help="time for the config sweep (0: none)")
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
            "copy_bw_GBps": copy_bandwidth() / 1e9, "repeats": REPEATS, "skipped": [], "warm_up": {}}
    log(f"{name}: peak {peak / 1e9:.0f} GB/s ({source}), copy {meta['copy_bw_GBps']:.0f} GB/s")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    _, d8, _ = TARGET_MODEL
    for r in TARGET_R:  # what the plugin would compile at start-up for this model, and how long it takes
        start = time.monotonic()
        count = steer_triton.warm_up(d8, r, K, torch.bfloat16, torch.bfloat16, 256, DEVICE)
        meta["warm_up"][f"D{d8}-R{r}"] = f"{count} variants, {time.monotonic() - start:.1f} s"
        log(f"warm_up D={d8} R={r}: {meta['warm_up'][f'D{d8}-R{r}']}")
    points = [(TARGET_MODEL, r, b) for r in TARGET_R for b in TARGET_B]
    points += [(m, r, b) for m in MODELS for r in sorted({64, m[1]}) for b in MORE_B
               if (m, r, b) not in points]
    heads: dict[str, torch.Tensor] = {}
    for (model, d, v), r, b in points:
        if time.monotonic() - t0 > args.budget_s:
            meta["skipped"].append({"model": model, "D": d, "R": r, "batch": b})
            continue
        if model not in heads:
            heads.clear()
            torch.cuda.empty_cache()
            heads[model] = (torch.randn(v, d, device=DEVICE) * d**-0.5).bfloat16()
        row = bench_point(model, d, v, r, b, heads[model], peak, flush)
        rows.append(row)
        log(f"{model:>5} R={r:<5} B={b:<4} kernel {row['kernel_us']:8.1f} us (x{row['x_floor']:.2f} floor, "
            f"{row['pct_of_lm_head']:5.2f}% of LM head, unsteered {row['kernel_unsteered_us']:.1f}, eager "
            f"{row['kernel_eager_us']:.1f}) torch {row['torch_us']:8.1f} head {row['lm_head_us']:8.1f}")
        write(args.outdir, meta, rows, sweep_rows)
    heads.clear()
    torch.cuda.empty_cache()
    if meta["skipped"]:
        log(f"time budget spent: {len(meta['skipped'])} grid points not run")
    if args.sweep_budget_s > 0:
        sweep_rows = sweep(args.sweep_budget_s, peak, flush, log,
                           lambda s: write(args.outdir, meta, rows, s))
    write(args.outdir, meta, rows, sweep_rows)
    print("\n".join(summary_lines(rows)), flush=True)
    log(f"wrote {args.outdir / 'kernel_bench.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
