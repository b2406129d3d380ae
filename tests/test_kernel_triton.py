"""The Triton gather steer kernel (and the torch op) against a float64 reference of the formula,
computed here independently, row by row and slot by slot:

    h'_b = h_b + sum_s sum_k row_values[b, s, k] * (h_b @ P1_k(n)) @ P2_k(n)^T,  n = row_steer[b, s]

Without CUDA the kernels run in Triton's CPU interpreter (a correctness check, meaningless for
speed); on a CUDA device (benchmarks/gpu_check.sh) the same tests run the compiled kernels.
Imports `vllm_steer.kernels`: installed, or from a raw checkout through the symlinked layout
that gpu_check.sh builds (torch, safetensors and Triton only). pytest is optional:
`python tests/test_kernel_triton.py` runs every case without it. tests/test_kernel_compile.py
compiles every launch listed by `kernel_cases.launch_cases()` for sm_90 and sm_80.

Every case NaN-poisons the weights of the loaded steers no row names and the row_values entries
the kernel must not read (slots naming no steer, dims past a steer's K): none may reach the output.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch  # importing torch does not import Triton

# TRITON_INTERPRET=1 has to be in the environment before Triton is imported and before the
# kernels are decorated by @triton.jit (the decorator reads it). Only without CUDA: on a GPU
# the compiled kernels are what is tested. An explicit setting by the caller wins. Once the
# kernels are loaded it is removed and set again only while this module's tests run
# (Triton's lazy imports read it at the first launch), so it does not leak into the vLLM
# server subprocesses that other tests of the suite start.
_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import pytest
except ImportError:  # the GPU machine may lack pytest: gpu_check.sh then runs main() below
    pytest = None

if pytest is not None:
    triton = pytest.importorskip("triton")  # skip the module cleanly where Triton is missing
else:
    import triton  # noqa: F401

from kernel_cases import BANKS, DTYPES, FORCED, MAIN, WARM, C, bank_cols, meta_inputs  # noqa: E402

from vllm_steer.kernels import triton_ops  # noqa: E402
from vllm_steer.kernels.layout import GatherLayout  # noqa: E402
from vllm_steer.kernels.steer_torch import steer_hidden_gather_torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(triton_ops.gather_kernels.shrink_kernel).__name__ != \
        "InterpretedFunction":  # imported earlier without the interpreter: the kernels first, then what binds them
    for module in (triton_ops.gather_kernels, triton_ops.gather_op, triton_ops):
        importlib.reload(module)
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

gather_triton = triton_ops.steer_hidden_gather_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerance: |out - ref| <= RTOL * |ref| + MTOL * mag, elementwise, where ref is the float64
# result and mag = |h| + sum_s,k |v| (|h| @ |P1_k|) @ |P2_k^T| bounds every partial sum.
# RTOL is the output dtype's rounding: round-to-nearest costs at most half a unit in the last
# place, i.e. 2^-8 relative for bf16, 2^-11 for fp16, 2^-24 for fp32 (fp16/fp32 doubled for
# slack). Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding (a limitation of
# the interpreter, not of the kernel: compiled casts round to nearest even), so interpreted
# bf16 gets a full unit, 2^-7. MTOL covers fp32 accumulation over at most a few hundred terms
# (n * 2^-24 ~ 2e-5 worst case, ~1e-6 typical), the tf32 hi/lo splits (~2^-19) and, for bf16
# weights, the kernel's hi+lo bf16 split of the fp32 intermediate (~2^-16 relative).
# The deltas are O(1) like h (see _inputs), so any real mistake in the delta is O(1) off.
_BF16_RTOL = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" or _SET_INTERPRET else 2.0**-8
TOL = {torch.float32: (2.0**-23, 1e-5), torch.bfloat16: (_BF16_RTOL, 1e-4), torch.float16: (2.0**-10, 1e-4)}


if pytest is not None:

    @pytest.fixture(autouse=True)
    def _interpreter_env(monkeypatch):
        if _SET_INTERPRET:
            monkeypatch.setenv("TRITON_INTERPRET", "1")


def _cases(values: list, ids: list[str]):
    """pytest.mark.parametrize("case", ...) under pytest; otherwise record them for main()."""
    if pytest is not None:
        return pytest.mark.parametrize("case", values, ids=ids)

    def mark(fn):
        fn.cases = values
        return fn

    return mark


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _row_steer(mix: str, b: int, s: int, n: int, g: torch.Generator) -> torch.Tensor:
    """[B, S] bank indices, -1 none. distinct: row i on steer i mod N (slot 0); shared: every row
    on one steer; composed: every row several steers (slot 1 repeating slot 0 in row 0, a free
    slot here and there); mixed: random, about a third of the slots free and every third row
    unsteered; none: nothing steered."""
    rs = torch.full((b, s), -1, dtype=torch.int64)
    if mix == "distinct":
        rs[:, 0] = torch.arange(b) % n
    elif mix == "shared":
        rs[:, 0] = n // 2
    elif mix == "composed":
        rs[:] = torch.randint(0, n, (b, s), generator=g)
        if s >= 2:
            rs[0, 1] = rs[0, 0]  # the same steer twice in one row
        if s >= 3:
            rs[1::3, 2] = -1
    elif mix == "mixed":
        rs[:] = torch.randint(0, n, (b, s), generator=g)
        rs[torch.rand(b, s, generator=g) < 1 / 3] = -1
        rs[2::3] = -1
        if b >= 2:
            rs[0, 0] = 0
    elif mix != "none":
        raise ValueError(mix)
    return rs


def _inputs(mix: str, b: int, s: int, d: int, bank: str, dtype: torch.dtype, wdtype: torch.dtype, seed: int):
    """(hidden, down, up, cols, row_steer, row_values) on DEVICE, scaled so that a steered row's
    delta is about as large as h. Poisoned with NaN: the weights of steers no row names, the
    values of free slots and of dims past a steer's K. Some dims of steered slots are zero."""
    g = torch.Generator().manual_seed(seed)
    steers = BANKS[bank]
    rows, c, u = bank_cols(steers)
    n = len(steers)
    h = torch.randn(b, d, generator=g)
    down = torch.randn(d, c, generator=g) / d**0.5
    up = torch.empty(u, d)
    for (start, k, r, _), _ in zip(rows, steers, strict=True):
        up[start:start + k * r] = torch.randn(k * r, d, generator=g) / (r * k * s) ** 0.5
        # h_b . P1_k[:, 0] ~ 1 for every row, not left to chance (matters for rank 1)
        down[:, start:start + k * r:r] += (h.sum(0) / (d * b**0.5))[:, None]
    rs = _row_steer(mix, b, s, n, g)
    kmax = max(k for _, k in steers)
    values = torch.randn(b, s, kmax, generator=g) + torch.sign(torch.randn(b, s, kmax, generator=g)) * 0.5
    values[torch.rand(b, s, kmax, generator=g) < 0.2] = 0.0  # some dims off
    values[:, :, 0] = torch.where(values[:, :, 0] == 0, 1.0, values[:, :, 0])  # dim 0 never off
    for n_, (start, k, r, _) in enumerate(rows):
        values[:, :, k:][rs == n_] = float("nan")  # dims past this steer's K: never read
        if not (rs == n_).any():  # a loaded steer no row names: never read
            down[:, start:start + k * r] = float("nan")
            up[start:start + k * r] = float("nan")
    values[rs < 0] = float("nan")
    cols = torch.tensor(rows, dtype=torch.int32)
    return (h.to(DEVICE, dtype), down.to(DEVICE, wdtype), up.to(DEVICE, wdtype), cols.to(DEVICE),
            rs.to(DEVICE), values.to(DEVICE))


def reference(h, down, up, cols, row_steer, row_values) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in float64, one (row, slot) at a time (not via the torch op), and the magnitude
    bound mag (the same sums over absolute values)."""
    h64, d64, u64 = h.double().cpu(), down.double().cpu(), up.double().cpu()
    out, mag = h64.clone(), h64.abs()
    cols_l, rs, vals = cols.tolist(), row_steer.tolist(), row_values.double().cpu()
    for b, slots in enumerate(rs):
        for s, n in enumerate(slots):
            if n < 0:
                continue
            start, k, r, up_start = cols_l[n]
            for j in range(k):
                v = vals[b, s, j].item()
                p1 = d64[:, start + j * r:start + (j + 1) * r]
                p2 = u64[up_start + j * r:up_start + (j + 1) * r]
                out[b] += v * ((h64[b] @ p1) @ p2)
                mag[b] += abs(v) * ((h64[b].abs() @ p1.abs()) @ p2.abs())
    return out, mag


def check(out: torch.Tensor, h, down, up, cols, row_steer, row_values) -> None:
    """out against the float64 reference; rows naming no steer bit-identical to h."""
    assert out.shape == h.shape and out.dtype == h.dtype
    assert not torch.isnan(out).any(), "NaN in the output: an element left unwritten, or poison read"
    unsteered = (row_steer < 0).all(dim=1)
    assert torch.equal(out[unsteered], h[unsteered]), "an unsteered row is not bit-identical to its input"
    ref, mag = reference(h, down, up, cols, row_steer, row_values)
    rtol, mtol = TOL[h.dtype]
    bound = rtol * ref.abs() + mtol * mag
    excess = (out.double().cpu() - ref).abs() - bound
    assert (excess <= 0).all(), f"error over the bound by up to {excess.max().item():.3g} ({_name(h.dtype)})"
    steered = ~unsteered.cpu()
    if steered.any():  # the steered rows really moved: the check above was not vacuous
        moved = (ref[steered] - h.double().cpu()[steered]).abs().max().item()
        assert moved > 10 * bound[steered].max().item(), "delta too small for the test to mean anything"


def _main_id(case) -> str:
    (mix, b, s), bank, d, dt, wdt, _ = case
    return f"{mix}-B{b}-S{s}-{bank}-D{d}-{_name(dt)}-w{_name(wdt)}"


@_cases(MAIN, [_main_id(c) for c in MAIN])
def test_gather_matches_float64(case):
    (mix, b, s), bank, d, dtype, wdtype, seed = case
    args = _inputs(mix, b, s, d, bank, dtype, wdtype, seed)
    out = torch.full_like(args[0], float("nan"))  # poisoned: every element must be written
    res = gather_triton(*args, out=out)
    assert res is out
    check(out, *args)
    fresh = gather_triton(*args, layout=GatherLayout.of(args[3].tolist()))  # run to run bit-identical
    assert torch.equal(fresh, out), "not deterministic"


@_cases(FORCED, [f"{s[0]}-B{s[1]}-S{s[2]}-{s[3]}-split{c.split_k}-m{c.block_m}-{_name(dt)}" for s, c, dt, _ in FORCED])
def test_forced_configs(case):
    (mix, b, s, bank, d), cfg, dtype, wdtype = case
    args = _inputs(mix, b, s, d, bank, dtype, wdtype, seed=100 + b + s + d)
    out = torch.full_like(args[0], float("nan"))
    gather_triton(*args, out=out, cfg=cfg)
    check(out, *args)
    again = torch.full_like(out, float("nan"))
    gather_triton(*args, out=again, cfg=cfg)
    assert torch.equal(again, out), "not deterministic"


def test_explicit_stages_are_used_as_given():
    """An explicit stage count reaches Triton unchanged (it refuses one that does not fit, rather
    than the launcher quietly cutting it back); None means the per-target automatic depth, which
    pipelines the default configs at the GPU targets' sizes."""
    target = triton_ops.TARGETS["sm_90"]
    layout = dict(b=256, s=1, d=4096, bank="aligned", dtype=torch.bfloat16, wdtype=torch.bfloat16)
    hidden, down, up, cols, rs, values, out, lay = meta_inputs(layout)
    cfg = triton_ops.default_config(hidden, down, rs, lay, target)
    auto = triton_ops.plan_launches(hidden, down, up, cols, rs, values, out, lay, cfg, target, False)
    kernels = triton_ops.gather_kernels
    assert [launch.kernel for launch in auto[1:3]] == [kernels.shrink_kernel, kernels.expand_kernel]
    assert all(launch.kwargs["num_stages"] >= 3 for launch in auto[1:3]), "the default config is not pipelined"
    forced = C(**{**cfg.__dict__, "shrink_stages": 9, "expand_stages": 8})
    plan = triton_ops.plan_launches(hidden, down, up, cols, rs, values, out, lay, forced, target, False)
    assert [launch.kwargs["num_stages"] for launch in plan[1:3]] == [9, 8]


def test_explicit_config_that_does_not_fit_is_refused():
    """On a GPU, stages that do not fit in shared memory are refused (Triton's OutOfResources),
    never quietly reduced. Only meaningful compiled: the interpreter has no shared memory."""
    if DEVICE != "cuda":
        if pytest is not None:
            pytest.skip("needs a GPU: the interpreter has no shared-memory limit")
        return
    args = _inputs("mixed", 70, 1, 512, "aligned", torch.bfloat16, torch.bfloat16, seed=9)
    too_big = C(64, 128, 256, 1, 256, 128, shrink_stages=12, expand_stages=12)
    try:
        gather_triton(*args, cfg=too_big)
        torch.cuda.synchronize()
    except Exception as exc:  # triton.runtime.errors.OutOfResources
        assert "resource" in f"{type(exc).__name__} {exc}".lower(), exc
    else:
        raise AssertionError("a config needing more shared memory than the GPU has was launched")


TORCH_CASES = [(("composed", 6, 4), "mixed_ranks", 67, torch.float32), (("mixed", 7, 1), "aligned", 128, torch.float32),
               (("mixed", 20, 2), "many", 48, torch.bfloat16), (("distinct", 1, 1), "many", 48, torch.float16)]


@_cases(TORCH_CASES, [f"{m}-B{b}-S{s}-{bank}-{_name(dt)}" for (m, b, s), bank, _, dt in TORCH_CASES])
def test_torch_op_matches_float64(case):
    (mix, b, s), bank, d, dtype = case
    args = _inputs(mix, b, s, d, bank, dtype, torch.float32, seed=200 + b + s)
    check(steer_hidden_gather_torch(*args), *args)


def test_unsteered_rows_are_copies():
    """Rows naming no steer come back bit for bit, even -0.0 and inf in h and NaN in the weights
    of the steer other rows use (h + 0 would turn -0.0 into +0.0, and 0 * NaN is NaN)."""
    for dtype, wdtype in DTYPES[:2]:
        for mix in ("none", "mixed"):
            h, down, up, cols, rs, values = _inputs(mix, 9, 2, 50, "aligned", dtype, wdtype, seed=3)
            h[2, :3] = torch.tensor([-0.0, float("inf"), float("-inf")])
            up[5, :] = float("nan")  # steer 0's first up row: only rows naming steer 0 may be NaN
            out = torch.full_like(h, float("nan"))
            gather_triton(h, down, up, cols, rs, values, out=out)
            free = (rs < 0).all(dim=1)
            bits = torch.int16 if dtype != torch.float32 else torch.int32
            assert bool(free[2])
            assert torch.equal(out[free].view(bits), h[free].view(bits))
            assert not torch.isnan(out[~(rs == 0).any(dim=1)]).any()


def test_strided_inputs_and_in_place():
    """Views as vLLM may hand them over: h a column slice of a wider buffer, row_values a slice of
    a wider table, row_steer int64 and strided; then out=hidden in place gives the same bits."""
    b, s, d = 7, 2, 67
    h, down, up, cols, rs, values = _inputs("mixed", b, s, d, "mixed_ranks", torch.bfloat16, torch.bfloat16, seed=11)
    wide = torch.randn(b, d + 9, device=DEVICE).to(torch.bfloat16)
    wide[:, 4:4 + d] = h
    h_view = wide[:, 4:4 + d]
    kmax = values.shape[2]
    table = torch.randn(b, s, kmax + 2, device=DEVICE)
    table[:, :, 1:1 + kmax] = values
    v_view = table[:, :, 1:1 + kmax]
    rs_wide = torch.full((b, 2 * s), 3, dtype=torch.int64, device=DEVICE)
    rs_wide[:, ::2] = rs
    rs_view = rs_wide[:, ::2]
    before = wide.clone()
    out = gather_triton(h_view, down, up, cols, rs_view, v_view)
    check(out, h, down, up, cols, rs, values)
    gather_triton(h_view, down, up, cols, rs_view.to(torch.int32), v_view, out=h_view)
    assert torch.equal(h_view, out)
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + d:], before[:, 4 + d:])


def test_warm_up_launches_every_variant():
    """warm_up compiles (launches) each distinct variant the heuristic picks for batches 1..40 with
    1..3 slots once: the count equals the distinct launch keys, computed here one (B, S) at a time."""
    steers = BANKS[WARM["bank"]]
    rows, c, u = bank_cols(steers)
    lay = GatherLayout.of(rows)
    kmax = max(k for _, k in steers)
    target = triton_ops.target_for(torch.empty(1, device=DEVICE))
    down, up = torch.zeros(WARM["d"], c, device=DEVICE), torch.zeros(u, WARM["d"], device=DEVICE)
    cols = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    expected: set[tuple] = set()
    for s in range(1, WARM["max_steers"] + 1):
        for b in range(1, WARM["max_batch"] + 1):
            layout = dict(b=b, s=s, d=WARM["d"], bank=WARM["bank"], dtype=torch.float32, wdtype=torch.float32)
            hidden, mdown, mup, mcols, rs, values, out, _ = meta_inputs(layout)
            cfg = triton_ops.default_config(hidden, mdown, rs, lay, target)
            launches = triton_ops.plan_launches(hidden, mdown, mup, mcols, rs, values, out, lay, cfg, target, False)
            expected.update(launch.key for launch in launches)
    assert len(expected) > 5, "the sizes should make the heuristic pick several variants"
    count = triton_ops.warm_up(down, up, cols, kmax, WARM["max_batch"], WARM["max_steers"], torch.float32)
    assert count == len(expected)
    assert triton_ops.variant_keys(down, up, cols, kmax, WARM["max_batch"], WARM["max_steers"], torch.float32,
                                     target) == expected


def test_degenerate_sizes_and_refusals():
    h, down, up, cols, rs, values = _inputs("mixed", 3, 2, 20, "many", torch.float32, torch.float32, seed=5)
    assert gather_triton(h[:0], down, up, cols, rs[:0], values[:0]).shape == (0, 20)
    assert torch.equal(gather_triton(h, down, up, cols, rs[:, :0], values[:, :0]), h)
    dense = cols.clone()
    dense[1, 3] = -1
    try:
        gather_triton(h, down, up, dense, rs, values)
    except ValueError as exc:
        assert "dense" in str(exc)
    else:
        raise AssertionError("a dense bank was accepted")


def test_cuda_graph_replay_with_new_rows():
    """Captured once, replayed with other steers and values copied into the same buffers: the same
    bits as eager calls (fixed grids, no host synchronisation). GPU only."""
    if DEVICE != "cuda":
        if pytest is not None:
            pytest.skip("needs a GPU")
        return
    h, down, up, cols, rs, values = _inputs("mixed", 33, 2, 128, "aligned", torch.bfloat16, torch.bfloat16, seed=21)
    down.nan_to_num_()  # the replays name steers the first rows did not: no poison here
    up.nan_to_num_()
    lay = GatherLayout.of(cols.tolist())
    out = torch.empty_like(h)
    gather_triton(h, down, up, cols, rs, values, out=out, layout=lay)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_triton(h, down, up, cols, rs, values, out=out, layout=lay)
    for seed in (22, 23, 24):
        _, _, _, _, rs2, values2 = _inputs(("composed", "distinct", "none")[seed - 22], 33, 2, 128, "aligned",
                                           torch.bfloat16, torch.bfloat16, seed=seed)
        rs.copy_(rs2)
        values.copy_(torch.nan_to_num(values2))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, gather_triton(h, down, up, cols, rs, values, layout=lay))


def test_padded_bank_reads_past_k_r_safely():
    """Steers whose columns start 16-aligned with NaN gaps between them (a bank packed with padding):
    COL_ALIGN is full, the down loads run past K*r into the gap, and nothing of it reaches the output."""
    d, b, s = 40, 7, 2
    steers = [(3, 2), (5, 1), (16, 2), (1, 3)]
    g = torch.Generator().manual_seed(41)
    rows, start = [], 0
    for r, k in steers:
        rows.append([start, k, r, start])
        start += (k * r + 15) // 16 * 16
    for dtype, wdtype in DTYPES[:2]:
        down = torch.full((d, start), float("nan"))
        up = torch.full((start, d), float("nan"))
        for (st, k, r, _), _ in zip(rows, steers, strict=True):
            down[:, st:st + k * r] = torch.randn(d, k * r, generator=g) / d**0.5 + 0.3
            up[st:st + k * r] = torch.randn(k * r, d, generator=g) / (k * r * s) ** 0.5
        h = torch.randn(b, d, generator=g)
        rs = torch.tensor([[0, 1], [2, -1], [3, 3], [-1, -1], [1, 2], [3, 0], [2, 2]])
        values = torch.randn(b, s, 3, generator=g) + 0.5
        args = (h.to(DEVICE, dtype), down.to(DEVICE, wdtype), up.to(DEVICE, wdtype),
                torch.tensor(rows, dtype=torch.int32, device=DEVICE), rs.to(DEVICE), values.to(DEVICE))
        lay = GatherLayout.of(rows)
        assert triton_ops.col_align(args[1], lay) == 16 // args[1].element_size()
        check(gather_triton(*args, layout=lay), *args)


def test_steer_bank_layout_drives_the_kernel():
    """A SteerBank packed as on CUDA (factored, ranks 1, 3 and 64) hands the kernel its host-side
    layout (no cols read-back): the kernel and the torch op on the bank against float64."""
    try:
        from vllm_steer import SteerFile
        from vllm_steer.steer.bank import KERNEL_STORAGE, SteerBank
    except ImportError as exc:  # a machine without the plugin's dependencies
        if pytest is not None:
            pytest.skip(f"vllm_steer's steer module cannot be imported: {exc}")
        return
    d = 48
    g = torch.Generator().manual_seed(31)
    steers = {f"s{r}": SteerFile.create(torch.randn(k, d, r, generator=g), torch.randn(k, d, r, generator=g),
                                        dim_names=[f"d{i}" for i in range(k)], epsilon=0.05)
              for r, k in [(1, 2), (3, 1), (64, 2)]}
    bank = SteerBank.pack(steers, KERNEL_STORAGE).placed(DEVICE, torch.float32)
    assert bank.layout == GatherLayout.of(bank.cols.tolist())
    h = torch.randn(6, d, generator=g).to(DEVICE)
    rs = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 2], [1, 0], [-1, 2]], dtype=torch.int32, device=DEVICE)
    values = torch.randn(6, 2, bank.max_dims, generator=g).to(DEVICE)
    args = (h, bank.down, bank.up, bank.cols, rs, values)
    check(gather_triton(*args, layout=bank.layout), *args)
    check(steer_hidden_gather_torch(*args), *args)


def test_benchmark_helpers_on_tiny_shapes():
    """benchmarks/kernel_bench.py's bank, rows, byte estimates, one point (timers stubbed) and its
    report, on tiny shapes in the interpreter: the GPU run should not be the first to execute them.
    CPU only (gpu_check.sh runs the benchmark itself on a GPU)."""
    if DEVICE == "cuda":
        if pytest is not None:
            pytest.skip("the GPU check runs the benchmark itself")
        return
    import importlib.util
    import tempfile
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("kernel_bench_smoke", path)
    kb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kb  # its dataclasses look their module up
    try:
        spec.loader.exec_module(kb)
    finally:
        del sys.modules[spec.name]
    kb.triton_ops = triton_ops  # the interpreter's kernels
    kb.DEVICE, kb.D, kb.LOADED, kb.BATCH, kb.RANKS = "cpu", 32, 6, 8, [4]
    kb.graph_time_us = lambda fn, flush: (fn(), 2.0)[1]
    kb.eager_time_us = lambda fn: (fn(), 3.0)[1]
    kb.device_target = lambda: triton_ops.TARGETS["interpreter"]
    bank = kb.make_bank(4, loaded=6, device="cpu")
    assert bank.layout.num_steers == 6 and bank.layout.max_cols == 8 and not bank.layout.dense
    rs, values = kb.make_rows(3, 2, loaded=6, batch=8, device="cpu")
    assert rs.shape == (8, 2) and len(rs.unique()) == 3 and values.shape == (8, 2, 2)
    rows = [kb.bench_point(bank, distinct, 1, 1e12, None) for distinct in (1, 3)]
    rows.append(kb.bench_point(bank, 2, 2, 1e12, None))
    for row in rows:
        assert row["max_abs_diff_vs_torch"] < 0.05 and row["est_bytes"] >= row["floor_bytes"]
        assert [x["kernel"] for x in row["launches"]] == ["plan_kernel", "shrink_kernel", "expand_kernel",
                                                          "finalize_kernel"]
    assert rows[1]["floor_bytes"] - rows[0]["floor_bytes"] == 2 * bank.steer_bytes
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"device": "cpu", "torch": torch.__version__, "triton": "-", "cuda": None, "date": "-",
                "peak_bw_GBps": 1000.0, "peak_bw_source": "test", "copy_bw_GBps": 1.0, "skipped": [], "warm_up": {}}
        checks = [{"rank": 4, "slots": 1, "ok": True, "replays": []}]
        kb.write(Path(tmp), meta, rows, checks, [])
        text = (Path(tmp) / "kernel_bench_summary.md").read_text()
        assert "| 4 | 1 | 3 |" in text and "rank 4 S=1: ok" in text


def main() -> int:
    """Run every test: through pytest where it is installed, else by hand (for a machine that
    has only torch and Triton)."""
    if pytest is not None:
        return int(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "--noconftest"]))
    if _SET_INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    failed = passed = 0
    for name, fn in sorted(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        for case in getattr(fn, "cases", [None]):
            try:
                fn() if case is None else fn(case)
                passed += 1
            except Exception as exc:  # report every failure, keep going
                failed += 1
                print(f"FAILED {name}[{case}]: {type(exc).__name__}: {exc}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
