"""GPU micro-benchmark of the per-row gather steer op, bf16: the Triton kernels
(vllm_steer.kernels.triton_ops) on a batch of 256 rows at D = 4096 with K = 2, a bank of 256
loaded steers of rank 64 or 1000, the rows spread over 1, 8, 64 or 256 distinct steers; then a
CUDA-graph check and a small sweep of launch configs around the heuristic's.

    python benchmarks/kernel_bench.py OUTDIR [--budget-s 150] [--sweep-budget-s 25]

Needs torch and Triton on a CUDA machine and `vllm_steer.kernels` importable (installed, or the
symlinked layout benchmarks/gpu_check.sh builds from a raw checkout).

Timing: the op is captured once in a CUDA graph (as vLLM runs decode) and each repeat replays it
after a 256 MB write that flushes L2, between CUDA events; the median of REPEATS. "eager µs" is
triton.testing.do_bench of the plain Python call (the sort and five launches, host overhead
included).

Floor: the bytes that must move: the weights of the steers the batch uses (down and up blocks,
read once), h read once and the output written once (row_steer, row_values and the scratch are
not counted), at the device's peak bandwidth (by device name: H200 4.8 TB/s, ...; else memory
clock x bus width; else a measured copy). "est. bytes" adds what the kernels move besides: the
fp32 coefficient scratch (written and read) and weights re-read by further 64-row chunks of a
steer (mostly L2 hits, counted as DRAM here: an upper estimate).

Targets (from the issue): with 64 distinct steers within 2x of the time with 1, and within 1.5x
of the floor. The graph check replays a captured call with new per-row steer indices and values
copied into its buffers and compares with eager calls (bit for bit) and the torch op.

OUTDIR/kernel_bench.{json,md} are rewritten after every point, so a killed run keeps what it
measured; OUTDIR/kernel_bench_summary.md is the targets table.
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

from vllm_steer.kernels import triton_ops
from vllm_steer.kernels.layout import GatherLayout
from vllm_steer.kernels.steer_torch import steer_hidden_gather_torch

DEVICE = "cuda"
REPEATS = 30
FLUSH_BYTES = 256 << 20
D = 4096
K = 2  # steer dims
BATCH = 256
LOADED = 256  # steers in the bank
RANKS = [64, 1000]
DISTINCT = [1, 8, 64, 256]
SLOTS_POINTS = [(64, 4)]  # (distinct, slots): rows composing 4 steers each (rank 64 only)
X_FLOOR_TARGET = 1.5
RATIO_TARGET = 2.0  # 64 distinct steers / 1 steer

# Peak HBM bandwidth by device-name substring, most specific first (vendor datasheets).
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
           ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
           ("B200", 8.0e12)]


def graph_time_us(fn: Callable[[], object], flush: torch.Tensor | None) -> float:
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
        if flush is not None:
            flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def eager_time_us(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


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


def device_target():
    """The config heuristic's view of this GPU."""
    return triton_ops.device_target(torch.cuda.current_device())


@dataclasses.dataclass
class Bank:
    """LOADED steers of one rank packed as SteerBank packs them: down [D, C], up [C, D] (bf16),
    cols [N, 4] int32, and its host-side layout."""

    rank: int
    down: torch.Tensor
    up: torch.Tensor
    cols: torch.Tensor
    layout: GatherLayout

    @property
    def steer_bytes(self) -> int:
        return 2 * D * K * self.rank * self.down.element_size()


def make_bank(rank: int, loaded: int | None = None, device: str | None = None) -> Bank:
    loaded, device = loaded or LOADED, device or DEVICE
    c = loaded * K * rank
    down = torch.empty(D, c, dtype=torch.bfloat16, device=device).normal_(0, D**-0.5)
    up = torch.empty(c, D, dtype=torch.bfloat16, device=device).normal_(0, (K * rank) ** -0.5)
    rows = [[n * K * rank, K, rank, n * K * rank] for n in range(loaded)]
    return Bank(rank, down, up, torch.tensor(rows, dtype=torch.int32, device=device), GatherLayout.of(rows))


def make_rows(distinct: int, slots: int, loaded: int | None = None, batch: int | None = None, seed: int = 0,
              device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """row_steer [batch, slots] int32 and row_values [batch, slots, K] fp32: the rows spread evenly
    over `distinct` steers chosen at random among the loaded ones, in a shuffled order (slot s of a
    row takes the next steer of the cycle)."""
    loaded, batch, device = loaded or LOADED, batch or BATCH, device or DEVICE
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(loaded, generator=g)[:distinct]
    flat = chosen[torch.arange(batch * slots) % distinct]
    flat = flat[torch.randperm(batch * slots, generator=g)]
    row_steer = flat.view(batch, slots).to(torch.int32)
    values = torch.randn(batch, slots, K, generator=g) * 1e-2
    return row_steer.to(device), values.to(device)


def floor_bytes(bank: Bank, distinct: int) -> int:
    return distinct * bank.steer_bytes + 2 * BATCH * D * 2


def estimated_bytes(bank: Bank, row_steer: torch.Tensor, cfg) -> int:
    """floor + the coefficient scratch (split_k partials, written and read) + the partial outputs
    of rows naming several steers + the weights re-read by each further chunk of a steer."""
    b, s = row_steer.shape
    counts = torch.bincount(row_steer.flatten().long().cpu(), minlength=LOADED)
    used = counts[counts > 0]
    chunks = sum(triton.cdiv(int(c), cfg.block_m) for c in used)
    w16 = (K * bank.rank + 15) // 16 * 16
    scratch = 2 * cfg.split_k * b * s * w16 * 4 + (2 * s * b * D * 4 if s > 1 else 0)
    return floor_bytes(bank, len(used)) + scratch + (chunks - len(used)) * bank.steer_bytes


def bench_point(bank: Bank, distinct: int, slots: int, peak: float, flush: torch.Tensor) -> dict:
    h = torch.randn(BATCH, D, device=DEVICE).bfloat16()
    row_steer, values = make_rows(distinct, slots)
    out = torch.empty_like(h)
    args = (h, bank.down, bank.up, bank.cols, row_steer, values)

    def call() -> torch.Tensor:
        return triton_ops.steer_hidden_gather_triton(*args, out=out, layout=bank.layout)

    kernel_us = graph_time_us(call, flush)
    eager_us = eager_time_us(call)
    none = torch.full_like(row_steer, -1)
    unsteered_us = graph_time_us(lambda: triton_ops.steer_hidden_gather_triton(
        h, bank.down, bank.up, bank.cols, none, values, out=out, layout=bank.layout), flush)
    torch_us = eager_time_us(lambda: steer_hidden_gather_torch(*args))  # syncs (tolist): eager only
    ref = steer_hidden_gather_torch(*args).float()
    got = call().float()
    floor = floor_bytes(bank, distinct)
    floor_us = floor / peak * 1e6
    target = device_target()
    cfg = triton_ops.default_config(h, bank.down, row_steer, bank.layout, target)
    launches = triton_ops.plan_launches(h, bank.down, bank.up, bank.cols, row_steer, values, out, bank.layout, cfg,
                                  target, False)
    est = estimated_bytes(bank, row_steer, cfg)
    return {"rank": bank.rank, "K": K, "D": D, "batch": BATCH, "slots": slots, "distinct": distinct,
            "loaded": LOADED, "kernel_us": kernel_us, "kernel_eager_us": eager_us, "unsteered_us": unsteered_us,
            "torch_eager_us": torch_us, "floor_bytes": floor, "floor_us": floor_us, "x_floor": kernel_us / floor_us,
            "est_bytes": est, "est_x_floor_bytes": est / floor,
            "achieved_GBps": floor / (kernel_us * 1e-6) / 1e9,
            "max_abs_diff_vs_torch": (got - ref).abs().max().item(), "config": dataclasses.asdict(cfg),
            "launches": [{"kernel": x.kernel.__name__, "grid": list(x.grid), "num_warps": x.kwargs["num_warps"],
                          "num_stages": x.kwargs["num_stages"]} for x in launches]}


def graph_check(bank: Bank, slots: int) -> dict:
    """Capture one call, then replay it with other rows' steers and values copied into its input
    buffers: every replay must equal an eager call on the same inputs bit for bit (and the torch
    op within bf16 rounding)."""
    h = torch.randn(BATCH, D, device=DEVICE).bfloat16()
    row_steer, values = make_rows(1, slots, seed=1)
    out = torch.empty_like(h)
    args = (h, bank.down, bank.up, bank.cols, row_steer, values)
    triton_ops.steer_hidden_gather_triton(*args, out=out, layout=bank.layout)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.steer_hidden_gather_triton(*args, out=out, layout=bank.layout)
    results = []
    for i, distinct in enumerate([64, 1, 256, 8, 0]):
        if distinct:
            new_steer, new_values = make_rows(distinct, slots, seed=10 + i)
            new_steer[::5, 0] = -1  # some rows unsteered
        else:
            new_steer, new_values = torch.full_like(row_steer, -1), torch.zeros_like(values)
        row_steer.copy_(new_steer)
        values.copy_(new_values)
        graph.replay()
        torch.cuda.synchronize()
        eager = triton_ops.steer_hidden_gather_triton(*args, layout=bank.layout)
        ref = steer_hidden_gather_torch(*args).float()
        results.append({"distinct": distinct, "equal_to_eager": bool(torch.equal(out, eager)),
                        "max_abs_diff_vs_torch": (out.float() - ref).abs().max().item(),
                        "unsteered_rows_identical": bool(torch.equal(out[(row_steer < 0).all(1)],
                                                                     h[(row_steer < 0).all(1)]))})
    return {"rank": bank.rank, "slots": slots, "replays": results,
            "ok": all(r["equal_to_eager"] and r["unsteered_rows_identical"] for r in results)}


# One parameter at a time around the heuristic config (explicit stage counts are used as given:
# a config that does not fit is refused by Triton and recorded as an error).
AXES = {"split_k": [1, 2, 4, 8], "block_c": [32, 64, 128], "block_k": [64, 128, 256], "block_d": [64, 128, 256],
        "block_r": [32, 64, 128], "programs_per_sm": [1, 2, 4], "shrink_stages": [3, 4, 6],
        "expand_stages": [3, 4, 6], "shrink_warps": [4, 8], "expand_warps": [4, 8]}
SWEEP_POINTS = [(1000, 64), (64, 1), (1000, 1), (64, 64)]  # (rank, distinct)


def sweep(banks: dict[int, Bank], budget_s: float, peak: float, flush: torch.Tensor, log, save) -> list[dict]:
    """Time configs around the heuristic one: data to retune _pick_config on this GPU."""
    t0, rows = time.monotonic(), []
    target = device_target()
    for rank, distinct in SWEEP_POINTS:
        if rank not in banks:
            continue
        bank = banks[rank]
        h = torch.randn(BATCH, D, device=DEVICE).bfloat16()
        row_steer, values = make_rows(distinct, 1)
        args = (h, bank.down, bank.up, bank.cols, row_steer, values)
        base = triton_ops.default_config(h, bank.down, row_steer, bank.layout, target)
        variants = [base] + [dataclasses.replace(base, **{f: x}) for f, xs in AXES.items() for x in xs
                             if x != getattr(base, f)]
        expected = steer_hidden_gather_torch(*args).float()
        floor_us = floor_bytes(bank, distinct) / peak * 1e6
        results = []
        for cfg in variants:
            if time.monotonic() - t0 > budget_s:
                break
            out = torch.empty_like(h)
            try:
                triton_ops.steer_hidden_gather_triton(*args, out=out, layout=bank.layout, cfg=cfg)
                err = (out.float() - expected).abs().max().item()
                us = graph_time_us(lambda cfg=cfg, out=out, args=args, lay=bank.layout:
                                   triton_ops.steer_hidden_gather_triton(*args, out=out, layout=lay, cfg=cfg), flush)
                results.append({"config": dataclasses.asdict(cfg), "us": us, "x_floor": us / floor_us,
                                "max_abs_diff_vs_torch": err, "heuristic": cfg == base})
            except Exception as exc:  # a config that does not fit this GPU: record and go on
                results.append({"config": dataclasses.asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:300]})
        timed = [x for x in results if "us" in x]
        if timed:
            best = min(timed, key=lambda x: x["us"])
            heur = next((x for x in timed if x["heuristic"]), None)
            rows.append({"rank": rank, "distinct": distinct, "floor_us": floor_us,
                         "heuristic_us": heur["us"] if heur else None, "best_us": best["us"],
                         "best_config": best["config"], "variants": results})
            log(f"sweep rank={rank} distinct={distinct}: heuristic {rows[-1]['heuristic_us'] or 0:.1f} us, "
                f"best {best['us']:.1f} us ({best['config']}), {len(timed)} configs")
            save(rows)
        if time.monotonic() - t0 > budget_s:
            log(f"sweep budget ({budget_s:.0f} s) spent")
            break
    return rows


def summary_lines(rows: list[dict], checks: list[dict]) -> list[str]:
    """The targets: 64 distinct steers within RATIO_TARGET x of 1 and within X_FLOOR_TARGET x of the floor."""
    lines = [f"## Against the targets (B = {BATCH}, D = {D}, K = {K}, bf16, {LOADED} steers loaded; 64 distinct "
             f"steers <= {RATIO_TARGET}x the time of 1, x floor <= {X_FLOOR_TARGET})", "",
             "| rank | slots | distinct | kernel µs | floor µs | x floor | | est. bytes / floor | unsteered µs |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for x in sorted(rows, key=lambda x: (x["rank"], x["slots"], x["distinct"])):
        ok = "met" if x["x_floor"] <= X_FLOOR_TARGET else "missed"
        lines.append(f"| {x['rank']} | {x['slots']} | {x['distinct']} | {x['kernel_us']:.1f} | {x['floor_us']:.2f} | "
                     f"{x['x_floor']:.2f} | {ok} | {x['est_x_floor_bytes']:.2f} | {x['unsteered_us']:.1f} |")
    if not rows:
        lines.append("| - | - | - | no point was measured | | | | | |")
    lines += ["", "| rank | time 64 distinct / 1 distinct | |", "|---:|---:|---|"]
    for rank in RANKS:
        one = next((x for x in rows if (x["rank"], x["slots"], x["distinct"]) == (rank, 1, 1)), None)
        many = next((x for x in rows if (x["rank"], x["slots"], x["distinct"]) == (rank, 1, 64)), None)
        if one and many:
            ratio = many["kernel_us"] / one["kernel_us"]
            lines.append(f"| {rank} | {ratio:.2f} | {'met' if ratio <= RATIO_TARGET else 'missed'} |")
        else:
            lines.append(f"| {rank} | not measured | |")
    lines += ["", "CUDA-graph replays with new per-row steers and values: " + (
        ", ".join(f"rank {c['rank']} S={c['slots']}: {'ok' if c['ok'] else 'MISMATCH'}" for c in checks)
        if checks else "not run")]
    return lines


def write(outdir: Path, meta: dict, rows: list[dict], checks: list[dict], sweep_rows: list[dict]) -> None:
    (outdir / "kernel_bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "graph_checks": checks,
                                                          "sweep": sweep_rows}, indent=1))
    lines = [f"# Gather steer op micro-benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}. bf16 hidden "
             f"state and weights. Times: medians of {REPEATS} CUDA-graph replays, L2 flushed before each; "
             f"'eager': do_bench of the Python call (host overhead included); the torch op (which reads "
             f"indices back to the host) eager only.", "",
             f"Floor: bytes of the used steers' down + up blocks, h read and the output written, at the peak "
             f"bandwidth {meta['peak_bw_GBps']:.0f} GB/s ({meta['peak_bw_source']}). Measured 1 GiB copy: "
             f"{meta['copy_bw_GBps']:.0f} GB/s. 'unsteered': the same call with every row naming no steer. "
             f"Warm-up (compiling every variant for 1..{BATCH} rows x 1..4 slots, per bank): "
             f"{meta.get('warm_up', {})}.", "",
             *summary_lines(rows, checks), "",
             "## All points", "",
             "| rank | S | distinct | kernel µs | eager µs | unsteered µs | torch op µs | floor µs | x floor | GB/s "
             "| max diff vs torch | launches |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in rows:
        grids = " + ".join(f"{y['kernel'].strip('_').removesuffix('_kernel')}{y['grid']}" for y in x["launches"])
        lines.append(f"| {x['rank']} | {x['slots']} | {x['distinct']} | {x['kernel_us']:.1f} | "
                     f"{x['kernel_eager_us']:.1f} | {x['unsteered_us']:.1f} | {x['torch_eager_us']:.1f} | "
                     f"{x['floor_us']:.2f} | {x['x_floor']:.2f} | {x['achieved_GBps']:.0f} | "
                     f"{x['max_abs_diff_vs_torch']:.3g} | {grids} |")
    if meta.get("skipped"):
        lines += ["", f"Not run (time budget): {len(meta['skipped'])} points, see the JSON."]
    if sweep_rows:
        lines += ["", "## Config sweep (one parameter at a time around the heuristic config)", "",
                  "| rank | distinct | floor µs | heuristic µs | best µs | best config |",
                  "|---:|---:|---:|---:|---:|---|"]
        for s in sweep_rows:
            heur = f"{s['heuristic_us']:.1f}" if s["heuristic_us"] is not None else "-"
            cfg = ", ".join(f"{k}={v}" for k, v in s["best_config"].items())
            lines.append(f"| {s['rank']} | {s['distinct']} | {s['floor_us']:.2f} | {heur} | {s['best_us']:.1f} "
                         f"| {cfg} |")
    (outdir / "kernel_bench.md").write_text("\n".join(lines) + "\n")
    (outdir / "kernel_bench_summary.md").write_text("\n".join(summary_lines(rows, checks)) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new points after this")
    parser.add_argument("--sweep-budget-s", type=float, default=25.0, help="time for the config sweep (0: none)")
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
    checks: list[dict] = []
    sweep_rows: list[dict] = []
    banks: dict[int, Bank] = {}

    def save(s: list[dict] | None = None) -> None:
        write(args.outdir, meta, rows, checks, sweep_rows if s is None else s)

    for rank in RANKS:
        if time.monotonic() - t0 > args.budget_s:
            meta["skipped"].append({"rank": rank, "all": True})
            continue
        bank = banks[rank] = make_bank(rank)
        start = time.monotonic()  # what the plugin compiles at start-up for this bank, and how long it takes
        count = triton_ops.warm_up(bank.down, bank.up, bank.cols, K, BATCH, 4, torch.bfloat16, bank.layout)
        meta["warm_up"][f"rank{rank}"] = f"{count} variants, {time.monotonic() - start:.1f} s"
        log(f"warm_up rank {rank}: {meta['warm_up'][f'rank{rank}']}")
        checks.append(graph_check(bank, 1))
        log(f"graph check rank {rank} S=1: {'ok' if checks[-1]['ok'] else 'MISMATCH'} {checks[-1]['replays']}")
        points = [(d, 1) for d in DISTINCT] + [p for p in SLOTS_POINTS if rank == RANKS[0]]
        for distinct, slots in points:
            if time.monotonic() - t0 > args.budget_s:
                meta["skipped"].append({"rank": rank, "distinct": distinct, "slots": slots})
                continue
            row = bench_point(bank, distinct, slots, peak, flush)
            rows.append(row)
            log(f"rank {rank:<5} S={slots} distinct {distinct:<4} kernel {row['kernel_us']:8.1f} us "
                f"(x{row['x_floor']:.2f} floor, est. bytes x{row['est_x_floor_bytes']:.2f}), unsteered "
                f"{row['unsteered_us']:.1f}, eager {row['kernel_eager_us']:.1f}, torch {row['torch_eager_us']:.1f}")
            save()
        if rank == RANKS[0] and time.monotonic() - t0 <= args.budget_s:
            checks.append(graph_check(bank, 4))
            log(f"graph check rank {rank} S=4: {'ok' if checks[-1]['ok'] else 'MISMATCH'}")
            save()
    if meta["skipped"]:
        log(f"time budget spent: {len(meta['skipped'])} points not run")
    if args.sweep_budget_s > 0:
        sweep_rows = sweep(banks, args.sweep_budget_s, peak, flush, log, save)
    save()
    print("\n".join(summary_lines(rows, checks)), flush=True)
    log(f"wrote {args.outdir / 'kernel_bench.md'} and .json")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
