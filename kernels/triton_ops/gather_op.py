"""The gather op on CUDA: `steer_hidden_gather_triton` (checks, the plan of one call's five launches, and
running them), `warm_up` (every variant a bank can need, compiled at start-up) and `variant_keys` (the
same, planned on meta tensors, for the compile test). The kernels are in gather_kernels.py, the launch
configurations in configs.py; the design is in docs/kernel.md.

    h'_b = h_b + sum_s sum_k row_values[b, s, k] * (h_b @ down[:, c_k]) @ up[u_k]

over the steers n = row_steer[b, s] a row names (-1: none), where steer n's dim k owns the columns
c_k = down_start + k*r .. + r of `down` and the rows u_k = up_start + k*r .. + r of `up` (cols[n] =
(down_start, K, r, up_start)): the semantics of `steer_torch.steer_hidden_gather_torch`, with every steer
factored (up_start >= 0)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from ..layout import GatherLayout, pow2_divisor
from .configs import (
    FIN_BLOCK_D,
    FIN_BLOCK_M,
    FIN_WARPS,
    PLAN_BLOCK_P,
    PLAN_WARPS,
    TARGETS,
    Config,
    Target,
    auto_stages,
    device_target,
    expand_stage_bytes,
    pick_config,
    shrink_stage_bytes,
)
from .gather_kernels import expand_kernel, finalize_kernel, plan_kernel, shrink_kernel

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the JIT function, its grid, positional arguments and keywords
    (constexprs and num_warps/num_stages). `key` names the compiled variant it needs (batch sizes,
    counts and loop lengths are not specialised, so they do not appear)."""

    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict

    @property
    def key(self) -> tuple:
        name = getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__
        return (name, tuple(sorted(self.kwargs.items())))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def col_align(down: torch.Tensor, layout: GatherLayout) -> int:
    """COL_ALIGN: 16 bytes' worth of elements if that divides every down_start, down's width and its
    row stride (vector loads), else 1 (two values: fewer compiled variants)."""
    full = 16 // down.element_size()
    return full if pow2_divisor(layout.start_align, down.shape[1], down.stride(0), cap=full) == full else 1


def plan_launches(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor,
                  row_steer: torch.Tensor, row_values: torch.Tensor, out: torch.Tensor, layout: GatherLayout,
                  cfg: Config, target: Target, interpret: bool) -> list[Launch]:
    """Sort the pairs (a torch op, queued on hidden's stream) and return the kernel launches for
    one call. `meta` tensors give the plan without memory (how the compile test and
    `variant_keys` enumerate the variants).

    hidden [B, D], down [D, C], up [U, D], cols [N, 4], row_steer [B, S], row_values [B, S, Kmax],
    out [B, D]; scratch: keys [P] (sorted row_steer) and order [P] int64 (their flat (row, slot)
    indices), chunk starts [P] and their count [1] int32, coef [split_k, P, W16] fp32 (W16 =
    max_cols rounded up to 16) and, for S > 1, ypart [S, B, D16] fp32."""
    b, d = hidden.shape
    s = row_steer.shape[1]
    p, n = b * s, cols.shape[0]
    dev = hidden.device
    h_size, w_size = hidden.element_size(), down.element_size()
    native = hidden.dtype == down.dtype and hidden.dtype in HALF
    hilo = up.dtype == torch.bfloat16 and hidden.dtype in HALF
    upcast = interpret and (hidden.dtype == torch.bfloat16 or up.dtype == torch.bfloat16)
    align = col_align(down, layout)
    programs = max(1, cfg.programs_per_sm * target.num_sms)
    chunks_max = max(1, min(p, triton.cdiv(p, cfg.block_m) + min(n, p)))

    keys, order = torch.sort(row_steer.reshape(p), stable=True)
    chunk = torch.empty((max(p, 1),), dtype=torch.int32, device=dev)
    count = torch.empty((1,), dtype=torch.int32, device=dev)
    w16 = _round_up(max(layout.max_cols, 1), 16)
    coef = torch.empty((cfg.split_k, p, w16), dtype=torch.float32, device=dev)
    if s > 1:
        ypart = torch.empty((s, b, _round_up(d, 16)), dtype=torch.float32, device=dev)
        ys, yb = ypart.stride(0), ypart.stride(1)
    else:  # no row names two steers: never written or read
        ypart, ys, yb = coef, 0, 0

    launches = [Launch(plan_kernel, (1, 1, 1), (keys, chunk, count, p, n, max(1, p.bit_length())),
                       dict(BLOCK_M=cfg.block_m, BLOCK_P=PLAN_BLOCK_P, num_warps=PLAN_WARPS, num_stages=1))]

    n_tiles = triton.cdiv(max(layout.max_cols, 1), cfg.block_c)
    k_tiles_per_split = triton.cdiv(triton.cdiv(d, cfg.block_k), cfg.split_k)
    grid = min(programs, chunks_max * n_tiles * cfg.split_k)
    shrink_stages = cfg.shrink_stages or auto_stages(shrink_stage_bytes(cfg, h_size, w_size), target)
    launches.append(Launch(
        shrink_kernel, (grid, 1, 1),
        (hidden, down, cols, keys, order, chunk, count, row_values, coef,
         p, s, d, n_tiles, k_tiles_per_split, grid,
         hidden.stride(0), hidden.stride(1), down.stride(0) // align, down.stride(1), cols.stride(0),
         row_values.stride(0), row_values.stride(1), row_values.stride(2), coef.stride(0), coef.stride(1)),
        dict(BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, COL_ALIGN=align,
             NATIVE=native, A_SPLIT=not native and hidden.dtype == torch.float32,
             B_SPLIT=not native and down.dtype == torch.float32, UPCAST=upcast and native,
             num_warps=cfg.shrink_warps, num_stages=shrink_stages),
    ))

    n_dtiles = triton.cdiv(d, cfg.block_d)
    grid = min(programs, chunks_max * n_dtiles)
    expand_stages = cfg.expand_stages or auto_stages(expand_stage_bytes(cfg, up.element_size()), target)
    launches.append(Launch(
        expand_kernel, (grid, 1, 1),
        (hidden, up, cols, keys, order, chunk, count, row_steer, coef, out, ypart,
         p, s, n, d, n_dtiles, grid,
         hidden.stride(0), hidden.stride(1), up.stride(0), up.stride(1), cols.stride(0),
         row_steer.stride(0), row_steer.stride(1), coef.stride(0), coef.stride(1),
         out.stride(0), out.stride(1), ys, yb),
        dict(SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r, HILO=hilo,
             B_SPLIT=not hilo and up.dtype == torch.float32, UPCAST=upcast and hilo, MULTI=s > 1,
             num_warps=cfg.expand_warps, num_stages=expand_stages),
    ))
    launches.append(Launch(
        finalize_kernel, (triton.cdiv(b, FIN_BLOCK_M), triton.cdiv(d, FIN_BLOCK_D), 1),
        (hidden, row_steer, ypart, out, b, s, n, d,
         hidden.stride(0), hidden.stride(1), row_steer.stride(0), row_steer.stride(1), ys, yb,
         out.stride(0), out.stride(1)),
        dict(BLOCK_M=FIN_BLOCK_M, BLOCK_D=FIN_BLOCK_D, num_warps=FIN_WARPS, num_stages=1),
    ))
    return launches


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1: the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _run(launches: list[Launch]) -> None:
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


def target_for(hidden: torch.Tensor) -> Target:
    """The Target a call on `hidden` launches for."""
    if hidden.is_cuda:
        return device_target(hidden.device.index if hidden.device.index is not None else torch.cuda.current_device())
    return TARGETS["interpreter"]  # CPU tensors: only meaningful under TRITON_INTERPRET=1 (the tests)


def default_config(hidden: torch.Tensor, down: torch.Tensor, row_steer: torch.Tensor, layout: GatherLayout,
                   target: Target) -> Config:
    """The heuristic's config for a call with these tensors (their shapes, dtypes and strides only)."""
    b, d = hidden.shape
    return pick_config(b * row_steer.shape[1], d, layout.max_cols, target, hidden.element_size(),
                       down.element_size(), col_align(down, layout), row_steer.shape[1] > 1)


def _check(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, row_steer: torch.Tensor,
           row_values: torch.Tensor, out: torch.Tensor | None, layout: GatherLayout) -> None:
    """Shape/dtype/device checks: metadata and the host-side layout only, no device synchronisation."""
    if hidden.dim() != 2 or down.dim() != 2 or up.dim() != 2 or cols.dim() != 2 or row_steer.dim() != 2 \
            or row_values.dim() != 3:
        raise ValueError("expected hidden [B, D], down [D, C], up [U, D], cols [N, 4], row_steer [B, S], "
                         "row_values [B, S, Kmax]")
    b, d = hidden.shape
    if down.shape[0] != d or up.shape[1] != d or cols.shape[1] != 4 or row_steer.shape[0] != b \
            or tuple(row_values.shape[:2]) != tuple(row_steer.shape) or cols.shape[0] != layout.num_steers:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)}, cols {tuple(cols.shape)} ({layout.num_steers} steers in the layout), "
                         f"row_steer {tuple(row_steer.shape)}, row_values {tuple(row_values.shape)}")
    if layout.dense:
        raise ValueError("the Triton gather kernel needs every steer factored (up_start >= 0); this bank stores "
                         "some dense (pack it with BankStorage.for_device('cuda'))")
    if row_values.shape[2] < layout.max_dims:
        raise ValueError(f"row_values has {row_values.shape[2]} dims per slot, a steer has {layout.max_dims}")
    if hidden.dtype not in (*HALF, torch.float32) or down.dtype not in (*HALF, torch.float32) \
            or up.dtype not in (*HALF, torch.float32):
        raise TypeError("hidden, down and up must be bf16, fp16 or fp32")
    if not row_values.is_floating_point() or cols.dtype not in (torch.int32, torch.int64) \
            or row_steer.dtype not in (torch.int32, torch.int64):
        raise TypeError("row_values must be floating point, cols and row_steer int32/int64")
    tensors = [down, up, cols, row_steer, row_values] + ([out] if out is not None else [])
    if any(t.device != hidden.device for t in tensors):
        raise ValueError("all tensors must be on hidden's device")
    if out is not None and (out.shape != hidden.shape or out.dtype != hidden.dtype):
        raise ValueError("out must have hidden's shape and dtype")


def steer_hidden_gather_triton(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    cols: torch.Tensor,
    row_steer: torch.Tensor,
    row_values: torch.Tensor,
    out: torch.Tensor | None = None,
    layout: GatherLayout | None = None,
    cfg: Config | None = None,
) -> torch.Tensor:
    """Every row of hidden steered by the steers it names, with fp32 accumulation; the semantics of
    `steer_hidden_gather_torch` (see the module docstring for the kernels).

    hidden [B, D] bf16/fp16/fp32 (any strides); down [D, C] and up [U, D] in hidden's dtype or
    another of those; cols [N, 4] int (down_start, K, r, up_start >= 0 per steer); row_steer [B, S]
    int (bank index per slot, -1 none); row_values [B, S, Kmax] float (eps folded in). Rows naming
    no steer are copied unchanged. `out` (hidden's shape and dtype) may be given, also `out=hidden`
    for an in-place update (every output element is written by the one program that read that
    element of hidden, after the shrink has finished with hidden). `layout`: the bank's host-side
    facts (`GatherLayout.of` its cols as host integers); None reads cols back from the device,
    which synchronises: for tests and benchmarks only, serving passes the bank's. `cfg`: an
    explicit launch config (tests and the benchmark's sweep), None the heuristic's.
    """
    if layout is None:
        layout = GatherLayout.of(cols.tolist())
    _check(hidden, down, up, cols, row_steer, row_values, out, layout)
    if out is None:
        out = torch.empty_like(hidden)
    b, d = hidden.shape
    if b == 0 or d == 0:
        return out
    if row_steer.shape[1] == 0 or layout.max_cols == 0:
        return out.copy_(hidden)
    target = target_for(hidden)
    cfg = cfg or default_config(hidden, down, row_steer, layout, target)
    if hidden.is_cuda:
        with torch.cuda.device(hidden.device):
            _run(plan_launches(hidden, down, up, cols, row_steer, row_values, out, layout, cfg, target, interpreting()))
    else:
        _run(plan_launches(hidden, down, up, cols, row_steer, row_values, out, layout, cfg, target, interpreting()))
    return out


def _warm_inputs(down: torch.Tensor, b: int, s: int, max_dims: int,
                 hidden_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, row_steer, row_values, out) for a warm-up launch on down's device: zeros, every slot
    of every row on steer 0 (so that every kernel runs its main loops once)."""
    dev = down.device
    hidden = torch.zeros((b, down.shape[0]), dtype=hidden_dtype, device=dev)
    row_steer = torch.zeros((b, s), dtype=torch.int32, device=dev)
    row_values = torch.zeros((b, s, max(1, max_dims)), dtype=torch.float32, device=dev)
    return hidden, row_steer, row_values, torch.empty_like(hidden)


def _variants(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, layout: GatherLayout, max_dims: int,
              max_batch: int, max_steers: int, hidden_dtype: torch.dtype, target: Target):
    """(batch, slots, launch keys) of the first batch shape that needs each new set of variants
    (the keys follow from the config and S > 1: one plan, on meta tensors, per distinct pair)."""
    configs: set[tuple[Config, bool]] = set()
    meta_down = torch.empty_strided(down.shape, down.stride(), dtype=down.dtype, device="meta")
    meta_up = torch.empty_strided(up.shape, up.stride(), dtype=up.dtype, device="meta")
    meta_cols = torch.empty_strided(cols.shape, cols.stride(), dtype=cols.dtype, device="meta")
    for s in range(1, max_steers + 1):
        for b in range(1, max_batch + 1):
            hidden, row_steer, row_values, out = _warm_inputs(meta_down, b, s, max_dims, hidden_dtype)
            cfg = default_config(hidden, meta_down, row_steer, layout, target)
            if (cfg, s > 1) in configs:  # the config and S > 1 (MULTI) make the keys
                continue
            configs.add((cfg, s > 1))
            launches = plan_launches(hidden, meta_down, meta_up, meta_cols, row_steer, row_values, out, layout, cfg,
                                     target, interpreting())
            yield b, s, [launch.key for launch in launches]


def warm_up(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, max_dims: int, max_batch: int,
            max_steers: int, hidden_dtype: torch.dtype, layout: GatherLayout | None = None) -> int:
    """Compile (by launching once, on zeros) every kernel variant `steer_hidden_gather_triton` can
    launch with this bank for batches of 1..max_batch rows of hidden_dtype naming 1..max_steers
    steers each, so that none compiles while serving; returns how many distinct variants that is.
    down [D, C], up [U, D], cols [N, 4] as in `steer_hidden_gather_triton`; `layout` None reads
    cols back (a synchronisation, fine at start-up)."""
    if max_batch <= 0 or max_steers <= 0 or down.shape[0] == 0:
        return 0
    layout = layout or GatherLayout.of(cols.tolist())
    if layout.max_cols == 0:
        return 0
    target = target_for(down)
    seen: set[tuple] = set()
    for b, s, keys in _variants(down, up, cols, layout, max_dims, max_batch, max_steers, hidden_dtype, target):
        if all(k in seen for k in keys):
            continue
        seen.update(keys)
        hidden, row_steer, row_values, out = _warm_inputs(down, b, s, max_dims, hidden_dtype)
        steer_hidden_gather_triton(hidden, down, up, cols, row_steer, row_values, out=out, layout=layout)
    return len(seen)


def variant_keys(down: torch.Tensor, up: torch.Tensor, cols: torch.Tensor, max_dims: int, max_batch: int,
                 max_steers: int, hidden_dtype: torch.dtype, target: Target,
                 layout: GatherLayout | None = None) -> set[tuple]:
    """The variant keys `warm_up` compiles for `target` (planned on meta tensors, no memory; down,
    up and cols may be meta tensors too when `layout` is given)."""
    layout = layout or GatherLayout.of(cols.tolist())
    keys: set[tuple] = set()
    if max_batch <= 0 or max_steers <= 0 or down.shape[0] == 0 or layout.max_cols == 0:
        return keys
    for _, _, ks in _variants(down, up, cols, layout, max_dims, max_batch, max_steers, hidden_dtype, target):
        keys.update(ks)
    return keys
