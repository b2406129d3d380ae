"""Compile-time checks of the Triton steer kernels for Hopper (sm_90) and Ampere (sm_80), on a
machine without a GPU: every kernel variant the plugin and the kernel tests can launch is
compiled with Triton for those targets, under this venv's Triton and under Triton 3.6 (the GPU
machine's), and its compiled form is checked: it compiles; its dots run on tensor cores
(mma.sync / wgmma of the expected input type); its main loops are software-pipelined (async
copies into as many shared-memory buffers as the stage count asks for); the default configs
spill no registers (ptxas -v) and fit the target's shared memory.

Why: the interpreter runs the kernels' logic on CPU but never compiles them, so a compile
failure in one specialisation (Triton turns an integer argument equal to 1 into a constant and
marks multiples of 16 as divisible: each such case is a separate compiled kernel) would
surface only on a GPU run.

How: the compiling happens in subprocesses (a clean Triton: TRITON_INTERPRET unset, a fresh
cache directory, so nothing is reused between runs; Triton 3.6 from .venv/triton36, which
scripts/setup_venv.sh installs, first on sys.path). Each worker enumerates the launches with the
kernel module's own planner on `meta` tensors (shapes, strides and alignment without memory),
asks Triton's own binder which specialisation each launch gets, keeps one launch per distinct
variant and compiles it with `triton.compile(ASTSource(...), target=GPUTarget(...))`.

    python tests/test_kernel_compile.py --report benchmarks/results/kernel_compile_sm90_sm80.md

writes the static figures of the default configs at D=4096 (compile-time facts, not
measurements). pytest runs the checks; `--worker` is the subprocess entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRITON36 = ROOT / ".venv" / "triton36"
ARCHS = {"sm_90": 90, "sm_80": 80}

# The plugin's grid: every batch 1..512 with 1..4 slots (the default max_steers_per_request) at
# these sizes. On CUDA the plugin keeps the steer weights in the model's dtype (bf16, fp16; fp32 for
# an fp32 model: serving/worker.py), so those pairs get the whole grid; fp32 weights under a 16-bit
# model (the kernel accepts them, the kernel tests use them) get D = 4096 and MIXED_BANKS.
PLUGIN_BATCHES = range(1, 513)
PLUGIN_SLOTS = range(1, 5)
PLUGIN_D = (64, 576, 2048, 4096, 8192)
# Banks as [(rank, dims)]: K*r of 2 (rank 1), 128, 400, 2000 (not multiples of 16 columns: 200,
# 1000 specialise differently), 8192 and 16384, and one whose steers start unaligned.
PLUGIN_BANKS = {"r1": [(1, 2)], "r64": [(64, 2), (64, 2)], "r200": [(200, 2)], "r1000": [(1000, 2), (1000, 2)],
                "r4096": [(4096, 2)], "r8192": [(8192, 2)], "unaligned": [(3, 2), (64, 2), (1, 1)]}
MIXED_BANKS = ("r4096",)
# The report's points (D = 4096, bf16, K = 2).
REPORT_R = (64, 1000)
REPORT_B = (1, 16, 64, 256)
REPORT_S = (1, 4)


# ------------------------------------------------------------------------------------------------
# Worker side: runs in a subprocess with the Triton under test.


def _dtype_pairs():
    import torch

    return [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def _tests_module():
    """tests/kernel_cases.py (the kernel tests' meta_inputs, bank_cols and launch_cases), imported with
    TRITON_INTERPRET=0: the kernels here are compiled-mode JITFunctions."""
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        import kernel_cases as tk
    finally:
        del os.environ["TRITON_INTERPRET"]
    return tk


def _enumerate(arch: str, subset: str) -> list[dict]:
    """The distinct variants for one target: [{'launch', 'labels', 'default', 'spec'}], one
    entry per Triton specialisation key, with the labels of the cases that need it.

    subset: "plugin" (the plugin's grid), "tests" (plus every launch of tests/test_kernel_triton.py),
    "report" (REPORT_R x REPORT_B x REPORT_S at D = 4096, bf16)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from vllm_steer.kernels import triton_ops as st
    from vllm_steer.kernels.layout import GatherLayout

    backend = make_backend(GPUTarget("cuda", ARCHS[arch], 32))
    target = st.TARGETS[arch]
    binders: dict = {}
    variants: dict = {}

    tk = _tests_module()
    assert type(st.gather_kernels.shrink_kernel).__name__ == "JITFunction"

    def add(label: str, layout: dict, cfg) -> None:
        hidden, down, up, cols, row_steer, values, out, lay = tk.meta_inputs(layout)
        default = cfg is None
        if default:
            cfg = st.default_config(hidden, down, row_steer, lay, target)
        for launch in st.plan_launches(hidden, down, up, cols, row_steer, values, out, lay, cfg, target, False):
            fn = launch.kernel
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            _, spec, _ = binders[fn](*launch.args, **launch.kwargs)  # what Triton specialises on
            key = (fn.__name__, repr(spec), launch.kwargs["num_warps"], launch.kwargs["num_stages"])
            entry = variants.setdefault(key, {"launch": launch, "labels": set(), "default": False, "spec": spec})
            entry["labels"].add(label)
            entry["default"] |= default
            entry.setdefault("layouts", []).append({k: str(v).removeprefix("torch.") for k, v in layout.items()})
            entry.setdefault("grids", {})[label] = list(launch.grid)  # the variant's grid differs per case

    pairs = _dtype_pairs()
    if subset in ("plugin", "tests"):
        grid = [(pair, PLUGIN_D, list(PLUGIN_BANKS), PLUGIN_BATCHES, PLUGIN_SLOTS) for pair in pairs[:3]]
        grid += [(pair, (4096,), MIXED_BANKS, PLUGIN_BATCHES, PLUGIN_SLOTS) for pair in pairs[3:]]
    else:
        grid = [(pairs[0], (4096,), [f"r{r}" for r in REPORT_R], REPORT_B, REPORT_S)]
    for (dt, wdt), dims, banks, batches, slots in grid:
        for d in dims:
            for bank in banks:
                steers = PLUGIN_BANKS[bank]
                rows, c, _ = tk.bank_cols(steers)
                lay = GatherLayout.of(rows)
                col_align = st.col_align(torch.empty(d, c, dtype=wdt, device="meta"), lay)
                seen = set()
                for s in slots:
                    for b in batches:
                        cfg = st.pick_config(b * s, d, lay.max_cols, target, dt.itemsize, wdt.itemsize, col_align,
                                              s > 1)
                        if (cfg, s > 1) in seen and subset != "report":  # B and S are not specialised
                            continue
                        seen.add((cfg, s > 1))
                        label = "plugin" if subset != "report" else f"D{d}-R{steers[0][0]}-B{b}-S{s}"
                        add(label, dict(b=b, s=s, d=d, steers=steers, dtype=dt, wdtype=wdt), None)
    if subset == "tests":
        for label, layout, cfg in tk.launch_cases():
            add(f"tests:{label}", layout, cfg)
    del torch
    return list(variants.values())


_MMA = re.compile(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.aligned\.[\w.]+)")
_ALLOC = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x(\w+),")


def _compile(launch, arch: str) -> dict:
    """Compile one launch for `arch`; the static facts of the result."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, options)
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v anyway; print its report
    log = io.StringIO()
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=opts.__dict__)
    except Exception as exc:  # a compile failure is the finding: record it in full
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:], "seconds": time.monotonic() - start}
    ttgir, ptx, ptxas = compiled.asm["ttgir"], compiled.asm["ptx"], log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    return {
        "ok": True, "seconds": time.monotonic() - start, "shared": compiled.metadata.shared,
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "async_copies": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "buffers": [[int(x) for x in dims.split("x")] + [ty] for dims, ty in _ALLOC.findall(ttgir)],
        "mma": sorted({m.split(".")[0] + "." + ".".join(p for p in m.split(".") if p in ("bf16", "f16", "tf32"))
                       for m in _MMA.findall(ptx)}),
    }


def _describe(entry: dict) -> dict:
    launch = entry["launch"]
    consts = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    names = [p.name for p in launch.kernel.params]
    attrs = {n: x[1] for n, x in zip(names, entry["spec"], strict=True) if x[0] != "constexpr" or n not in consts}
    return {"kernel": launch.kernel.__name__, "grid": list(launch.grid), "constexprs": consts,
            "num_warps": launch.kwargs["num_warps"], "num_stages": launch.kwargs["num_stages"],
            "arg_types": [x[0] for x in entry["spec"] if str(x[0]).startswith("*")],
            "specialisation": {n: a for n, a in attrs.items() if a}, "labels": sorted(entry["labels"]),
            "default": entry["default"], "layout": entry["layouts"][0], "grids": entry["grids"]}


def worker(argv: list[str]) -> int:
    """Subprocess entry: compile the variants of --plan (arch=subset pairs) for this process's
    Triton, every n-th from the i-th (--shard i/n), one JSON line per variant, written as it goes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--plan", default="sm_90=tests,sm_80=plugin", help="arch=subset,...")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile workers must not run under TRITON_INTERPRET")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_cases: the kernel tests' launch list
    import triton

    from vllm_steer.kernels import triton_ops as st

    if type(st.gather_kernels.shrink_kernel).__name__ != "JITFunction":
        raise SystemExit("the kernels were loaded for the interpreter")
    index, count = (int(x) for x in args.shard.split("/"))
    with args.out.open("w") as out:
        for item in args.plan.split(","):
            arch, subset = item.split("=")
            start = time.monotonic()
            variants = _enumerate(arch, subset)
            mine = variants[index::count]
            out.write(json.dumps({"header": True, "arch": arch, "subset": subset, "triton": triton.__version__,
                                  "variants": len(variants), "mine": len(mine),
                                  "enumerate_s": round(time.monotonic() - start, 1)}) + "\n")
            out.flush()
            tgt = st.TARGETS[arch]
            for entry in mine:  # named first on stdout, so that a crash (an abort in Triton) points at it
                print(f"compiling {arch}: {_describe(entry)}", flush=True)
                row = {"arch": arch, "subset": subset, "triton": triton.__version__, **_describe(entry),
                       "smem_per_block": tgt.smem_per_block, "smem_per_sm": tgt.smem_per_sm,
                       **_compile(entry["launch"], arch)}
                out.write(json.dumps(row) + "\n")
                out.flush()
    return 0


# ------------------------------------------------------------------------------------------------
# Parent side: start the workers, collect their rows.

# (Triton: None for this venv's, or a directory to put first on sys.path; plan; shards). Triton 3.6
# (the GPU machine's) compiles everything the kernel tests launch there (sm_90, the H200) and the
# plugin's grid for sm_80; the venv's newer Triton, about twice as slow to compile, the report's
# default configs (a forward-compatibility signal: no GPU here runs it).
JOBS = [(TRITON36, "sm_90=tests,sm_80=plugin", 2), (None, "sm_90=report,sm_80=report", 1)]
TIMEOUT_S = 1800  # a hang guard: about 4 minutes on two idle cores, several times that on a loaded machine


def run_workers(jobs: list[tuple[Path | None, str, int]], outdir: Path, timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Run every job's shards concurrently, each in a fresh interpreter with its own empty Triton
    cache, and return all their JSON lines (headers included)."""
    procs = []
    for j, (triton_dir, plan, shards) in enumerate(jobs):
        for i in range(shards):
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = str(outdir / f"cache{j}.{i}")
            env["PYTHONDONTWRITEBYTECODE"] = "1"
            if triton_dir is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), *filter(None, [env.get("PYTHONPATH")])])
            out = outdir / f"job{j}.{i}.jsonl"
            log = (outdir / f"job{j}.{i}.log").open("w")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--plan", plan, "--shard",
                   f"{i}/{shards}", "--out", str(out)]
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), out, log))
    deadline = time.monotonic() + timeout_s
    failures = []
    for proc, out, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failures.append(f"{out.name}: exit {rc}\n" + Path(log.name).read_text()[-3000:])
    if failures:
        raise RuntimeError("compile worker failed:\n" + "\n".join(failures))
    rows = []
    for _, out, _ in procs:
        rows += [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for cache in outdir.glob("cache*"):  # nothing is reused between runs: drop the compiled kernels
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def expected_mma(row: dict) -> str | None:
    """The tensor-core input type the row's dots must use (None: the kernel has no dot)."""
    c = row["constexprs"]
    if row["kernel"] == "shrink_kernel":
        if c["NATIVE"]:
            return {"*bf16": "bf16", "*fp16": "f16"}[row["arg_types"][0]]
        return "tf32"
    if row["kernel"] == "expand_kernel":
        return "bf16" if c["HILO"] else "tf32"
    return None


def weight_row_alignment(row: dict) -> int:
    """Bytes to which the rows of the main loop's weight tile are known to be aligned: cp.async
    (the pipeline's copies) needs 4 at least, so 2-byte weights with odd rows cannot be pipelined."""
    size = {"*bf16": 2, "*fp16": 2, "*fp32": 4}[row["arg_types"][1]]
    if row["kernel"] == "shrink_kernel":
        return row["constexprs"]["COL_ALIGN"] * size
    aligned = row["specialisation"].get("stride_ur") == "D" and row["specialisation"].get("up_ptr") == "D"
    return (16 if aligned else 1) * size


def pipeline_depth(row: dict) -> int:
    """Buffers of the main loop's weight tile in the compiled TTGIR (0: not pipelined)."""
    c = row["constexprs"]
    wtype = {"*bf16": "bf16", "*fp16": "f16", "*fp32": "f32"}[row["arg_types"][1]]
    tile = [c["BLOCK_K"], c["BLOCK_C"]] if row["kernel"] == "shrink_kernel" else [c["BLOCK_R"], c["BLOCK_D"]]
    depths = [b[0] for b in row["buffers"] if b[1:3] == tile and b[3] == wtype]
    return max(depths, default=0)


_MAIN_LOOP_KERNELS = ("shrink_kernel", "expand_kernel")


try:
    import pytest
except ImportError:  # the worker and --report need no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def compiled(tmp_path_factory) -> list[dict]:
        if not (TRITON36 / "triton").is_dir():
            pytest.fail(f"Triton 3.6 is not installed in {TRITON36}: run scripts/setup_venv.sh")
        rows = run_workers(JOBS, tmp_path_factory.mktemp("compile"))
        return rows

    def _variants(rows: list[dict]) -> list[dict]:
        return [r for r in rows if not r.get("header")]

    def _name(r: dict) -> str:
        return (f"{r['kernel']} {r['arch']} Triton {r['triton']} {r['constexprs']} warps={r['num_warps']} "
                f"stages={r['num_stages']} {r['arg_types']} specialised {r['specialisation']} for {r['labels']} "
                f"e.g. {r['layout']}")

    def test_both_tritons_and_targets_covered(compiled):
        headers = [r for r in compiled if r.get("header")]
        versions = {r["triton"] for r in headers}
        assert any(v.startswith("3.6") for v in versions), f"no Triton 3.6 worker ran: {versions}"
        assert {(r["arch"]) for r in headers} == set(ARCHS)
        for h in headers:  # every shard's variants came back
            got = sum(1 for r in _variants(compiled) if (r["arch"], r["subset"], r["triton"]) ==
                      (h["arch"], h["subset"], h["triton"]))
            want = sum(x["mine"] for x in headers if (x["arch"], x["subset"], x["triton"]) ==
                       (h["arch"], h["subset"], h["triton"]))
            assert got == want, f"{h}: {got} of {want} variants compiled"

    def test_every_variant_compiles(compiled):
        failed = [f"{_name(r)}\n    {r['error'][-600:]}" for r in _variants(compiled) if not r["ok"]]
        assert not failed, f"{len(failed)} variants fail to compile:\n" + "\n".join(failed)

    def test_dots_run_on_tensor_cores(compiled):
        wrong = []
        for r in _variants(compiled):
            want = expected_mma(r)
            if r["ok"] and want is not None and (not r["mma"] or any(not m.endswith("." + want) for m in r["mma"])):
                wrong.append(f"{_name(r)}: {r['mma']}, expected {want}")
        assert not wrong, "\n".join(wrong)

    def test_main_loops_pipelined(compiled):
        """Where the weights' rows are 16-byte aligned (every plugin launch with D and R multiples of
        8), the weight tiles stream through num_stages - 1 shared-memory buffers; where they allow
        only 4-byte copies (the kernel tests' odd sizes with fp32 weights) Triton pipelines less
        deeply, but still asynchronously; 2-byte rows (odd sizes, 16-bit weights) cannot be."""
        shallow = []
        for r in _variants(compiled):
            if r["ok"] and r["kernel"] in _MAIN_LOOP_KERNELS and weight_row_alignment(r) >= 4:
                depth = pipeline_depth(r)
                want = r["num_stages"] - 1 if weight_row_alignment(r) >= 16 else 1
                if r["async_copies"] == 0 or depth < want:
                    shallow.append(f"{_name(r)}: {r['async_copies']} async copies, {depth} buffers of the weight tile")
        assert not shallow, "\n".join(shallow)

    def test_default_configs_do_not_spill_and_fit(compiled):
        bad = []
        for r in _variants(compiled):
            if r["ok"] and r["default"]:
                if r["spill_stores"] or r["spill_loads"]:
                    bad.append(f"{_name(r)}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
                if r["shared"] > r["smem_per_block"]:
                    bad.append(f"{_name(r)}: {r['shared']} B of shared memory, the target allows {r['smem_per_block']}")
        assert not bad, "\n".join(bad)




def write_report(path: Path) -> None:
    """Compile the report's default configs with both Tritons and write their static figures."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(TRITON36, "sm_90=report,sm_80=report", 1), (None, "sm_90=report,sm_80=report", 1)]
        rows = [r for r in run_workers(jobs, Path(tmp)) if not r.get("header")]
    by_point: dict = {}
    for r in rows:
        for label in r["labels"]:
            by_point.setdefault((r["triton"], r["arch"], label), []).append({**r, "grid": r["grids"][label]})
    versions = sorted({r["triton"] for r in rows})
    lines = ["# Steer kernels: compile-time facts (sm_90, sm_80)", "",
             f"Static figures of the gather kernels the config heuristic picks at D = 4096, bf16 hidden state "
             f"and weights, banks of rank R with K = 2, B rows with S slots, compiled without a GPU by "
             f"`tests/test_kernel_compile.py --report` with Triton "
             f"{' and '.join(versions)} on {datetime.date.today().isoformat()}. These are compile-time facts "
             f"(registers and spills from ptxas -v, shared memory from Triton's metadata, pipeline buffers "
             f"from the TTGIR, tensor-core instructions from the PTX), not measurements: nothing here ran on a GPU.",
             "", "Columns per kernel: registers per thread / spill bytes (stores+loads) / shared memory KiB / "
             "stages (weight-tile buffers) / warps / tensor-core instruction. `-` = not launched. The shrink "
             "and expand grids are persistent (at most two programs per SM, looping over the work items).", ""]
    kernels = ["plan_kernel", "shrink_kernel", "expand_kernel", "finalize_kernel"]
    for version in versions:
        for arch in ARCHS:
            lines += [f"## {arch}, Triton {version}", "",
                      "| R | B | S | launch shape | plan | shrink | expand | finalize |",
                      "|---:|---:|---:|---|---|---|---|---|"]
            for r_ in REPORT_R:
                for b in REPORT_B:
                    for s_ in REPORT_S:
                        got = {x["kernel"]: x for x in by_point.get((version, arch, f"D4096-R{r_}-B{b}-S{s_}"), [])}
                        cells = []
                        for k in kernels:
                            x = got.get(k)
                            if x is None:
                                cells.append("-")
                            elif not x["ok"]:
                                cells.append("**compile error**")
                            else:
                                mma = ",".join(m.replace("mma.sync", "mma").replace("wgmma.mma_async", "wgmma")
                                               for m in x["mma"]) or "none"
                                depth = pipeline_depth(x) if k in _MAIN_LOOP_KERNELS else 0
                                cells.append(f"{x['registers']} / {x['spill_stores'] + x['spill_loads']} / "
                                             f"{x['shared'] / 1024:.0f} / {x['num_stages']} ({depth}) / "
                                             f"{x['num_warps']} / {mma}")
                        sh, ex = got.get("shrink_kernel"), got.get("expand_kernel")
                        shape = "-"
                        if sh and ex:
                            c, e = sh["constexprs"], ex["constexprs"]
                            shape = (f"shrink {c['BLOCK_M']}x{c['BLOCK_C']} k{c['BLOCK_K']} splitK {c['SPLIT_K']} "
                                     f"grid {sh['grid'][0]}; expand {e['BLOCK_M']}x{e['BLOCK_D']} r{e['BLOCK_R']} "
                                     f"grid {ex['grid'][0]}")
                        lines.append(f"| {r_} | {b} | {s_} | {shape} | " + " | ".join(cells) + " |")
            lines.append("")
    ok = [r for r in rows if r["ok"]]
    main = [r for r in ok if r["kernel"] in _MAIN_LOOP_KERNELS]
    lines += ["## Summary", "",
              f"{len(rows)} compiled kernels ({len(rows) - len(ok)} failed to compile); spills in "
              f"{sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])}; shrink/expand stages "
              f"{min(r['num_stages'] for r in main)}..{max(r['num_stages'] for r in main)}; registers up to "
              f"{max(r['registers'] for r in ok)}; shared memory up to "
              + ", ".join(f"{max(r['shared'] for r in ok if r['arch'] == a) / 1024:.0f} KiB on {a} (limit "
                          f"{next(r['smem_per_block'] for r in ok if r['arch'] == a) / 1024:.0f})" for a in ARCHS)
              + ". Tensor cores: " + ", ".join(sorted({m for r in ok for m in r["mma"]})) + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.exit(worker(sys.argv[1:]))
elif __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--report", type=Path, required=True, help="markdown file to write")
    write_report(cli.parse_args().report)
