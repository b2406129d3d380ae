"""The Triton steer kernel (and the torch op) against a float64 reference of the formula,
computed here independently: h + ((h @ down) * values[:, col_dim]) @ up.

Without CUDA the kernels run in Triton's CPU interpreter (a correctness check, meaningless for
speed); on a CUDA device (benchmarks/gpu_check.sh) the same tests run the compiled kernels.
Imports `vllm_steer.kernels`: installed, or from a raw checkout through the symlinked layout
that gpu_check.sh builds (torch, safetensors and Triton only). pytest is optional:
`python tests/test_kernel_triton.py` runs every case without it. tests/test_kernel_compile.py
compiles every launch listed by `launch_cases()` below for sm_90 and sm_80.
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

from vllm_steer.kernels import steer_triton  # noqa: E402
from vllm_steer.kernels.steer_torch import steer_hidden_torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(steer_triton._shrink_kernel).__name__ != "InterpretedFunction":
    steer_triton = importlib.reload(steer_triton)  # imported earlier without the interpreter
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

steer_hidden_triton = steer_triton.steer_hidden_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerance: |out - ref| <= RTOL * |ref| + MTOL * mag, elementwise, where ref is the float64
# result and mag = |h| + ((|h| @ |down|) * |values|) @ |up| bounds every partial sum.
# RTOL is the output dtype's rounding: round-to-nearest costs at most half a unit in the last
# place, i.e. 2^-8 relative for bf16, 2^-11 for fp16, 2^-24 for fp32 (fp16/fp32 doubled for
# slack). Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding (a limitation of
# the interpreter, not of the kernel: compiled casts round to nearest even), so interpreted
# bf16 gets a full unit, 2^-7. MTOL covers fp32 accumulation over at most a few hundred terms
# (n * 2^-24 ~ 2e-5 worst case, ~1e-6 typical) and, for bf16 weights, the kernel's hi+lo bf16
# split of the fp32 intermediate (~2^-16 relative).
# The deltas are O(1) like h (see _inputs), so any real mistake in the delta is O(1) off.
_BF16_RTOL = 2.0**-7 if os.environ.get("TRITON_INTERPRET") == "1" or _SET_INTERPRET else 2.0**-8
TOL = {torch.float32: (2.0**-23, 1e-5), torch.bfloat16: (_BF16_RTOL, 1e-4), torch.float16: (2.0**-10, 1e-4)}
# (hidden dtype, weight dtype): the model's dtype with weights in it, and fp32 weights.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]


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


def reference(h, down, up, col_dim, values) -> torch.Tensor:
    """The formula in float64 (not via steer_hidden_torch)."""
    h64 = h.double()
    coef = values.double()[:, col_dim.long()]
    return h64 + ((h64 @ down.double()) * coef) @ up.double()


def _magnitude(h, down, up, col_dim, values) -> torch.Tensor:
    h64 = h.double().abs()
    coef = values.double().abs()[:, col_dim.long()]
    return h64 + ((h64 @ down.double().abs()) * coef) @ up.double().abs()


def _inputs(b: int, d: int, r: int, k: int, dtype: torch.dtype, wdtype: torch.dtype, seed: int,
            zero_rows: list[int] | None = None):
    """Fresh random inputs (never zeros), scaled so that the delta is about as large as h.
    About a third of the rows are unsteered (all-zero values); among the steered rows some
    dims are zero. `zero_rows` overrides which rows are unsteered."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, d, generator=g)
    down = torch.randn(d, r, generator=g) / d**0.5
    down[:, 0] += h.sum(0) / (d * b**0.5)  # h_b . down[:, 0] ~ 1, not left to chance (matters for R=1)
    up = torch.randn(r, d, generator=g) / r**0.5
    col_dim = torch.randint(0, k, (r,), generator=g)
    col_dim[0] = 0  # dim 0 has a column and is never switched off: steered rows really move
    col_dim = torch.sort(col_dim).values
    values = torch.randn(b, k, generator=g) + torch.sign(torch.randn(b, k, generator=g)) * 0.5
    if k > 1:  # some single dims off in steered rows, never all of them
        off = torch.rand(b, k, generator=g) < 0.3
        off[:, 0] = False
        values[off] = 0.0
    if zero_rows is None:
        zero_rows = [i for i in range(b) if torch.rand((), generator=g) < 1 / 3]
        if b >= 2 and not zero_rows:
            zero_rows = [b - 1]
        if b >= 2 and len(zero_rows) == b:
            zero_rows = zero_rows[1:]
    values[zero_rows] = 0.0
    return (h.to(DEVICE, dtype), down.to(DEVICE, wdtype), up.to(DEVICE, wdtype), col_dim.to(DEVICE),
            values.to(DEVICE))


def check(out: torch.Tensor, h, down, up, col_dim, values) -> None:
    """out against the float64 reference; unsteered rows bit-identical to h."""
    assert out.shape == h.shape and out.dtype == h.dtype
    assert not torch.isnan(out).any(), "NaN in the output: an element was left unwritten (poisoned)"
    unsteered = (values == 0).all(dim=1)
    assert torch.equal(out[unsteered], h[unsteered]), "an unsteered row is not bit-identical to its input"
    ref = reference(h, down, up, col_dim, values)
    rtol, mtol = TOL[h.dtype]
    bound = rtol * ref.abs() + mtol * _magnitude(h, down, up, col_dim, values)
    excess = (out.double() - ref).abs() - bound
    assert (excess <= 0).all(), f"error over the bound by up to {excess.max().item():.3g} ({_name(h.dtype)})"
    if (~unsteered).any():  # the steered rows really moved: the check above was not vacuous
        moved = (ref[~unsteered] - h[~unsteered].double()).abs().max().item()
        assert moved > 10 * bound[~unsteered].max().item(), "delta too small for the test to mean anything"


# D in {67, 130}, R in {1, 33, 200}, Ktot in {1, 3, 5}, B in {1, 7, 33}: every combination,
# each with one dtype pair (the pairs rotate so every pair meets every size).
SHAPES = [(b, d, r, k) for d in (67, 130) for r in (1, 33, 200) for k in (1, 3, 5) for b in (1, 7, 33)]
MAIN = [(shape, *DTYPES[i % len(DTYPES)], i) for i, shape in enumerate(SHAPES)]


@_cases(MAIN, [f"B{b}-D{d}-R{r}-K{k}-{_name(dt)}-w{_name(wdt)}" for (b, d, r, k), dt, wdt, _ in MAIN])
def test_kernel_matches_float64(case):
    (b, d, r, k), dtype, wdtype, seed = case
    zero_rows = [] if b == 1 and seed % 2 == 0 else None  # B=1: steered or not, alternately
    args = _inputs(b, d, r, k, dtype, wdtype, seed=seed, zero_rows=zero_rows)
    out = torch.full_like(args[0], float("nan"))  # poisoned: every element must be written
    res = steer_hidden_triton(*args, out=out)
    assert res is out
    check(out, *args)
    fresh = steer_hidden_triton(*args)  # without `out`, and run-to-run bit-identical
    assert torch.equal(fresh, out)


# Explicit launch configs, to cover what the size heuristics rarely pick at these sizes: splits
# over D (2, 3, 5 partial buffers, an empty trailing split), splits over R (the third launch),
# 16-, 32- and 64-row blocks, narrow and wide D blocks, explicit stage counts.
C = steer_triton._Config
CONFIGS = [
    ((7, 130, 200, 3), C(16, 64, 32, 3, 32, 64, split_r=2)),
    ((33, 130, 200, 5), C(32, 32, 16, 5, 16, 32, split_r=3, shrink_stages=2, expand_stages=4)),
    ((33, 67, 33, 2), C(64, 64, 32, 2, 128, 16, split_r=2)),
    ((70, 96, 75, 4), C(64, 32, 32, 3, 64, 16)),
    ((5, 200, 150, 2), C(16, 32, 16, 16, 16, 16, split_r=10, expand_warps=2)),  # empty D splits, 10 partials
]
FORCED = [(shape, cfg, dt, wdt) for shape, cfg in CONFIGS for dt, wdt in (DTYPES[0], DTYPES[1])]


@_cases(FORCED, [f"B{s[0]}-D{s[1]}-R{s[2]}-K{s[3]}-split{c.split_k}x{c.split_r}-{_name(dt)}" for s, c, dt, _ in FORCED])
def test_forced_configs(case):
    shape, cfg, dtype, wdtype = case
    args = _inputs(*shape, dtype, wdtype, seed=100 + sum(shape))
    out = torch.full_like(args[0], float("nan"))
    steer_triton._launch(*args, out=out, cfg=cfg)
    check(out, *args)
    again = torch.full_like(out, float("nan"))
    steer_triton._launch(*args, out=again, cfg=cfg)
    assert torch.equal(again, out), "not deterministic"


def test_explicit_stages_are_used_as_given():
    """An explicit stage count reaches Triton unchanged (it refuses one that does not fit, rather
    than the launcher quietly cutting it back); None means the per-target automatic depth."""
    h, down, up, col_dim, values = (torch.empty(s, dtype=dt, device="meta") for s, dt in
                                    [((8, 4096), torch.bfloat16), ((4096, 4096), torch.bfloat16),
                                     ((4096, 4096), torch.bfloat16), ((4096,), torch.int64),
                                     ((8, 2), torch.float32)])
    target = steer_triton.TARGETS["sm_90"]
    cfg = steer_triton._pick_config(8, 4096, 4096, target)
    auto = steer_triton._plan(h, down, up, col_dim, values, h, cfg, target, False)
    assert all(launch.kwargs["num_stages"] >= 3 for launch in auto[:2]), "the default config is not pipelined"
    forced = C(**{**cfg.__dict__, "shrink_stages": 9, "expand_stages": 8})
    plan = steer_triton._plan(h, down, up, col_dim, values, h, forced, target, False)
    assert [launch.kwargs["num_stages"] for launch in plan[:2]] == [9, 8]


def test_explicit_config_that_does_not_fit_is_refused():
    """On a GPU, stages that do not fit in shared memory are refused (Triton's OutOfResources),
    never quietly reduced. Only meaningful compiled: the interpreter has no shared memory."""
    if DEVICE != "cuda":
        if pytest is not None:
            pytest.skip("needs a GPU: the interpreter has no shared-memory limit")
        return
    args = _inputs(70, 512, 512, 2, torch.bfloat16, torch.bfloat16, seed=9)
    too_big = C(64, 128, 256, 1, 256, 128, shrink_stages=12, expand_stages=12)
    try:
        steer_triton._launch(*args, out=torch.empty_like(args[0]), cfg=too_big)
    except Exception as exc:  # triton.runtime.errors.OutOfResources
        assert "resource" in f"{type(exc).__name__} {exc}".lower(), exc
    else:
        raise AssertionError("a config needing more shared memory than the GPU has was launched")


TORCH_CASES = [((7, 130, 200, 3), torch.float32), ((33, 67, 33, 5), torch.float32),
               ((7, 130, 200, 3), torch.bfloat16), ((1, 67, 1, 1), torch.float16)]


@_cases(TORCH_CASES, [f"B{s[0]}-D{s[1]}-R{s[2]}-K{s[3]}-{_name(dt)}" for s, dt in TORCH_CASES])
def test_torch_op_matches_float64(case):
    shape, dtype = case
    args = _inputs(*shape, dtype, torch.float32, seed=200 + sum(shape))
    check(steer_hidden_torch(*args), *args)


def test_all_rows_unsteered_are_copies():
    """Nothing steered: the output is the input bit for bit, even for -0.0 and inf in h and
    NaN in the weights (h + 0 would turn -0.0 into +0.0, and 0 * NaN is NaN)."""
    for dtype, wdtype in DTYPES[:2]:
        h, down, up, col_dim, values = _inputs(9, 50, 20, 2, dtype, wdtype, seed=3, zero_rows=list(range(9)))
        h[0, :3] = torch.tensor([-0.0, float("inf"), float("-inf")])
        up[5, :] = float("nan")
        out = torch.full_like(h, float("nan"))
        steer_hidden_triton(h, down, up, col_dim, values, out=out)
        assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           h.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_unused_steer_skipped_and_correct():
    """Two steers loaded (dims 0-1 and 2), the batch only uses the first: the columns of the
    second are skipped tile by tile and the result is still the formula's."""
    h, down, up, _, values = _inputs(5, 96, 192, 3, torch.float32, torch.float32, seed=7, zero_rows=[2])
    col_dim = torch.tensor([0] * 64 + [1] * 64 + [2] * 64, device=DEVICE)
    values[:, 2] = 0.0
    out = torch.full_like(h, float("nan"))
    steer_triton._launch(h, down, up, col_dim, values, out=out, cfg=C(16, 64, 32, 1, 32, 64))
    check(out, h, down, up, col_dim, values)
    out_split = torch.full_like(h, float("nan"))  # split over R: the skip in a range that starts mid-way
    steer_triton._launch(h, down, up, col_dim, values, out=out_split, cfg=C(16, 32, 32, 2, 32, 32, split_r=3))
    check(out_split, h, down, up, col_dim, values)


def test_strided_inputs_and_in_place():
    """Views as vLLM may hand them over: h a column slice of a wider buffer, values a slice of
    a wider table, col_dim int32; then out=hidden in place gives the same bits."""
    b, d, r, k = 7, 67, 33, 3
    h, down, up, col_dim, values = _inputs(b, d, r, k, torch.bfloat16, torch.bfloat16, seed=11)
    wide = torch.randn(b, d + 9, device=DEVICE).to(torch.bfloat16)
    wide[:, 4:4 + d] = h
    h_view = wide[:, 4:4 + d]
    table = torch.randn(b, k + 2, device=DEVICE)
    table[:, 1:1 + k] = values
    v_view = table[:, 1:1 + k]
    before = wide.clone()
    out = steer_hidden_triton(h_view, down, up, col_dim.to(torch.int32), v_view)
    check(out, h, down, up, col_dim, values)
    steer_hidden_triton(h_view, down, up, col_dim, v_view, out=h_view)
    assert torch.equal(h_view, out)
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + d:], before[:, 4 + d:])


def test_row_values_gathered_through_slots():
    """Model Runner V2 gathers each row's values from a slot table (-1 = the zero row)."""
    h, down, up, col_dim, table = _inputs(6, 48, 40, 3, torch.float32, torch.float32, seed=4, zero_rows=[])
    table = torch.cat([table, torch.zeros(1, 3, device=DEVICE)])
    slots = torch.tensor([2, 0, -1, 5, 1, -1], device=DEVICE)
    values = table[slots]
    check(steer_hidden_triton(h, down, up, col_dim, values), h, down, up, col_dim, values)


WARM_D, WARM_R, WARM_K, WARM_MAX_BATCH = 40, 24, 2, 40


def test_warm_up_launches_every_variant():
    """warm_up compiles (launches) each distinct variant the heuristic picks for batches 1..40 once:
    the count equals the distinct launch keys of the configs, computed here one batch at a time."""
    target = steer_triton._target_for(torch.empty(1, device=DEVICE))
    expected: set[tuple] = set()
    for b in range(1, WARM_MAX_BATCH + 1):
        h = torch.empty(b, WARM_D, device="meta")
        down = torch.empty(WARM_D, WARM_R, device="meta")
        cfg = steer_triton._pick_config(b, WARM_D, WARM_R, target, 4, 4)
        plan = steer_triton._plan(h, down, down.T, torch.empty(WARM_R, dtype=torch.int64, device="meta"),
                                  torch.empty(b, WARM_K, device="meta"), h, cfg, target, False)
        expected.update(launch.key for launch in plan)
    assert len(expected) > 3, "the sizes should make the heuristic pick several variants"
    count = steer_triton.warm_up(WARM_D, WARM_R, WARM_K, torch.float32, torch.float32, WARM_MAX_BATCH, DEVICE)
    assert count == len(expected)
    assert steer_triton.variant_keys(WARM_D, WARM_R, WARM_K, torch.float32, torch.float32, WARM_MAX_BATCH,
                                     target) == expected


def test_degenerate_sizes():
    h, down, up, col_dim, values = _inputs(3, 20, 16, 2, torch.float32, torch.float32, seed=5)
    empty = steer_hidden_triton(h[:0], down, up, col_dim, values[:0])
    assert empty.shape == (0, 20)
    no_cols = steer_hidden_triton(h, down[:, :0], up[:0], col_dim[:0], values)
    assert torch.equal(no_cols, h)


def launch_cases() -> list[tuple[str, dict, steer_triton._Config | None]]:
    """Every kernel call this module makes on a GPU, as (label, layout, explicit config or None
    for the heuristic's), for tests/test_kernel_compile.py to compile for sm_90 and sm_80. layout:
    b, d, r, k, dtype, wdtype, and for views: h_pad (extra columns of the buffer h is a column
    slice of), h_off (its first column), v_pad/v_off (the same for row_values), col32 (int32
    col_dim), in_place (out=hidden)."""
    cases: list[tuple[str, dict, steer_triton._Config | None]] = []
    for (b, d, r, k), dt, wdt, _ in MAIN:
        cases.append(("matches_float64", dict(b=b, d=d, r=r, k=k, dtype=dt, wdtype=wdt), None))
    for shape, cfg, dt, wdt in FORCED:
        cases.append(("forced_configs", dict(zip("bdrk", shape, strict=True), dtype=dt, wdtype=wdt), cfg))
    for dt, wdt in DTYPES[:2]:
        cases.append(("all_rows_unsteered", dict(b=9, d=50, r=20, k=2, dtype=dt, wdtype=wdt), None))
    f32 = dict(dtype=torch.float32, wdtype=torch.float32)
    cases.append(("unused_steer", dict(b=5, d=96, r=192, k=3, **f32), C(16, 64, 32, 1, 32, 64)))
    cases.append(("unused_steer", dict(b=5, d=96, r=192, k=3, **f32), C(16, 32, 32, 2, 32, 32, split_r=3)))
    strided = dict(b=7, d=67, r=33, k=3, dtype=torch.bfloat16, wdtype=torch.bfloat16,
                   h_pad=9, h_off=4, v_pad=2, v_off=1)
    cases.append(("strided", {**strided, "col32": True}, None))
    cases.append(("strided_in_place", {**strided, "in_place": True}, None))
    cases.append(("gathered_values", dict(b=6, d=48, r=40, k=3, **f32), None))
    for b in range(1, WARM_MAX_BATCH + 1):
        cases.append(("warm_up", dict(b=b, d=WARM_D, r=WARM_R, k=WARM_K, **f32), None))
    cases.append(("does_not_fit", dict(b=70, d=512, r=512, k=2, dtype=torch.bfloat16, wdtype=torch.bfloat16),
                  C(64, 128, 256, 1, 256, 128, shrink_stages=12, expand_stages=12)))
    return cases


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
