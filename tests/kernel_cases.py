"""The Triton kernel tests' cases, shared by the tests that run them (tests/test_kernel_triton.py) and the test
that compiles every launch they make for sm_90 and sm_80 (tests/test_kernel_compile.py): the banks, dtype pairs,
batch shapes and explicit configs, the meta tensors of a launch's layout, and the list of every launch. Import it
after choosing Triton's interpreter (the kernels are decorated when vllm_steer.kernels.triton_ops is first
imported); it needs only torch and Triton."""

from __future__ import annotations

import torch

from vllm_steer.kernels import triton_ops
from vllm_steer.kernels.layout import GatherLayout

# (hidden dtype, weight dtype): the model's dtype with weights in it, and fp32 weights.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]

# Banks: (rank r, dims K) per steer, side by side as SteerBank packs them.
BANKS = {
    # ranks 1, 3, 64 (and 5): the columns of most steers start unaligned (COL_ALIGN 1)
    "mixed_ranks": [(1, 1), (3, 2), (64, 2), (5, 3), (3, 1)],
    # every start a multiple of 16 columns (COL_ALIGN 8 for bf16, 4 for fp32): vector loads
    "aligned": [(64, 2), (16, 1), (32, 2), (64, 2), (8, 2)],
    # many small steers: rows on distinct steers
    "many": [(r, k) for r, k in zip([1, 3, 2, 8, 1, 4, 3, 16, 2, 1, 5, 8], [1, 2, 3, 1, 2, 1, 2, 2, 1, 3, 1, 2],
                                    strict=True)],
}


def bank_cols(steers: list[tuple[int, int]]) -> tuple[list[list[int]], int, int]:
    """The cols rows (down_start, K, r, up_start) of steers packed side by side, and (C, U)."""
    rows, start = [], 0
    for r, k in steers:
        rows.append([start, k, r, start])
        start += k * r
    return rows, start, start


# (mix, B, S): rows on distinct steers, rows sharing one (70 rows: two chunks of 64), composed
# rows (2..4 slots, the same steer twice), free slots and unsteered rows, a whole unsteered
# batch; B = 1 and odd B. Each against two banks at two hidden sizes, the dtype pairs rotating.
SHAPES = [("distinct", 7, 1), ("distinct", 33, 1), ("distinct", 1, 1), ("shared", 70, 1), ("shared", 5, 2),
          ("shared", 1, 3), ("composed", 9, 2), ("composed", 6, 4), ("composed", 33, 3), ("composed", 1, 4),
          ("mixed", 7, 1), ("mixed", 20, 2), ("mixed", 3, 3), ("none", 5, 1), ("none", 4, 3)]
MAIN = [(shape, bank, d, *DTYPES[(i + j) % len(DTYPES)], 10 * i + j)
        for i, shape in enumerate(SHAPES) for j, (bank, d) in enumerate([("mixed_ranks", 67), ("aligned", 128)])]
MAIN += [(("distinct", 12, 1), "many", 48, *DTYPES[i], 500 + i) for i in range(len(DTYPES))]
MAIN += [(("mixed", 11, 3), "many", 48, *DTYPES[i], 600 + i) for i in range(len(DTYPES))]


# Explicit launch configs, to cover what the heuristic rarely picks at these sizes: splits over D
# (2, 3, 5, 8 partials, empty trailing splits), 16-, 32- and 64-pair chunks, narrow and wide
# tiles, explicit stage counts, one program per SM (each program walks many work items).
C = triton_ops.Config
CONFIGS = [
    (("composed", 9, 2, "mixed_ranks", 67), C(16, 16, 16, 3, 32, 16, programs_per_sm=1)),
    (("mixed", 20, 2, "aligned", 128), C(32, 32, 32, 2, 64, 32, shrink_stages=2, expand_stages=4)),
    (("shared", 70, 1, "aligned", 128), C(64, 64, 16, 5, 16, 16, programs_per_sm=1)),
    (("distinct", 12, 1, "many", 48), C(16, 32, 32, 8, 128, 64, programs_per_sm=1)),  # splits 2..7 empty
    (("composed", 33, 3, "mixed_ranks", 67), C(64, 128, 32, 1, 128, 64, shrink_warps=8, expand_warps=8)),
]
FORCED = [(shape, cfg, dt, wdt) for shape, cfg in CONFIGS for dt, wdt in (DTYPES[0], DTYPES[1])]
WARM = dict(d=40, bank="mixed_ranks", max_batch=40, max_steers=3)


def meta_inputs(layout: dict):
    """Meta tensors (shapes, dtypes, strides and alignment without memory) for a launch_cases()
    layout: (hidden, down, up, cols, row_steer, row_values, out, GatherLayout). layout: b, s, d,
    bank (a BANKS key) or steers (its [(r, K)] list), dtype, wdtype, and for views: h_pad (extra
    columns of the buffer h is a column slice of), h_off (its first column), v_pad/v_off (the same
    for row_values' last dim), rs64 (int64 row_steer), rs_strided (a column-strided view),
    in_place (out=hidden)."""
    b, s, d = layout["b"], layout["s"], layout["d"]
    steers = layout["steers"] if "steers" in layout else BANKS[layout["bank"]]
    dt, wdt = layout["dtype"], layout["wdtype"]
    rows, c, u = bank_cols(steers)
    kmax = max(k for _, k in steers)
    if layout.get("h_pad"):
        hidden = torch.empty(b, d + layout["h_pad"], dtype=dt, device="meta")[:, layout["h_off"]:layout["h_off"] + d]
    else:
        hidden = torch.empty(b, d, dtype=dt, device="meta")
    if layout.get("v_pad"):
        values = torch.empty(b, s, kmax + layout["v_pad"], device="meta")[:, :, layout["v_off"]:layout["v_off"] + kmax]
    else:
        values = torch.empty(b, s, kmax, device="meta")
    rs_dtype = torch.int64 if layout.get("rs64") else torch.int32
    row_steer = torch.empty(b, 2 * s, dtype=rs_dtype, device="meta")[:, ::2] if layout.get("rs_strided") \
        else torch.empty(b, s, dtype=rs_dtype, device="meta")
    down = torch.empty(d, c, dtype=wdt, device="meta")
    up = torch.empty(u, d, dtype=wdt, device="meta")
    cols = torch.empty(len(rows), 4, dtype=torch.int32, device="meta")
    out = hidden if layout.get("in_place") else torch.empty(b, d, dtype=dt, device="meta")
    return hidden, down, up, cols, row_steer, values, out, GatherLayout.of(rows)


def launch_cases() -> list[tuple[str, dict, triton_ops.Config | None]]:
    """Every kernel call this module makes on a GPU, as (label, layout, explicit config or None for
    the heuristic's), for tests/test_kernel_compile.py to compile for sm_90 and sm_80 (see
    `meta_inputs` for the layout's keys)."""
    cases: list[tuple[str, dict, triton_ops.Config | None]] = []
    for (_, b, s), bank, d, dt, wdt, _ in MAIN:
        cases.append(("matches_float64", dict(b=b, s=s, d=d, bank=bank, dtype=dt, wdtype=wdt, rs64=True), None))
    for (_, b, s, bank, d), cfg, dt, wdt in FORCED:
        cases.append(("forced_configs", dict(b=b, s=s, d=d, bank=bank, dtype=dt, wdtype=wdt, rs64=True), cfg))
    for dt, wdt in DTYPES[:2]:
        cases.append(("unsteered_rows", dict(b=9, s=2, d=50, bank="aligned", dtype=dt, wdtype=wdt, rs64=True), None))
    strided = dict(b=7, s=2, d=67, bank="mixed_ranks", dtype=torch.bfloat16, wdtype=torch.bfloat16, h_pad=9, h_off=4,
                   v_pad=2, v_off=1)
    cases.append(("strided", {**strided, "rs64": True, "rs_strided": True}, None))
    cases.append(("strided_in_place", {**strided, "in_place": True}, None))
    for s in range(1, WARM["max_steers"] + 1):
        for b in range(1, WARM["max_batch"] + 1):
            cases.append(("warm_up", dict(b=b, s=s, d=WARM["d"], bank=WARM["bank"], dtype=torch.float32,
                                          wdtype=torch.float32), None))
    for dt, wdt in DTYPES[:2]:
        # the same launch shape as the padded bank's: C = 80, largest K*r 32, 16-aligned starts
        cases.append(("padded_bank", dict(b=7, s=2, d=40, steers=[(8, 2), (16, 1), (16, 2), (16, 1)], dtype=dt,
                                          wdtype=wdt, rs64=True), None))
    cases.append(("degenerate", dict(b=3, s=2, d=20, bank="many", dtype=torch.float32, wdtype=torch.float32,
                                     rs64=True), None))
    cases.append(("cuda_graph", dict(b=33, s=2, d=128, bank="aligned", dtype=torch.bfloat16, wdtype=torch.bfloat16,
                                     rs64=True), None))
    cases.append(("does_not_fit", dict(b=70, s=1, d=512, bank="aligned", dtype=torch.bfloat16, wdtype=torch.bfloat16,
                                       rs64=True), C(64, 128, 256, 1, 256, 128, shrink_stages=12, expand_stages=12)))
    return cases
