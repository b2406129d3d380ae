"""The gather op's launch configurations: what it knows of each GPU target (SMs, shared memory) and the
size heuristic that picks tiles, splits, warps and pipeline stages from host-known sizes only (never
from tensor contents, so the grids suit CUDA graphs). The rules and their reasons are in docs/kernel.md;
tests/test_kernel_compile.py checks that the defaults spill no registers on sm_80 and sm_90."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Target:
    """What the config heuristic needs to know about a GPU."""

    num_sms: int
    smem_per_block: int  # the most dynamic shared memory one program may opt into (bytes)
    smem_per_sm: int  # shared memory of one multiprocessor, shared by its resident programs


# (capability major, minor) -> (smem per block opt-in, smem per SM), from CUDA's tuning guides.
_SMEM = {(8, 0): (166912, 167936), (8, 6): (101376, 102400), (8, 7): (166912, 167936), (8, 9): (101376, 102400),
         (9, 0): (232448, 233472), (10, 0): (232448, 233472), (12, 0): (101376, 102400)}
# Nominal targets for compiling without a GPU (tests, reports) and for the interpreter.
TARGETS = {"sm_90": Target(132, *_SMEM[(9, 0)]), "sm_80": Target(108, *_SMEM[(8, 0)]),
           "interpreter": Target(8, *_SMEM[(9, 0)])}


@functools.cache
def device_target(device_index: int) -> Target:
    """The Target of CUDA device `device_index`, from its properties."""
    props = torch.cuda.get_device_properties(device_index)
    per_block, per_sm = _SMEM.get((props.major, props.minor), (101376, 102400))
    per_block = getattr(props, "shared_memory_per_block_optin", per_block) or per_block
    per_sm = getattr(props, "shared_memory_per_multiprocessor", per_sm) or per_sm
    return Target(props.multi_processor_count, per_block, per_sm)


@dataclass(frozen=True)
class Config:
    """Launch shape, chosen from host-known sizes only, never from tensor contents. Stages None: as
    many as fit two programs per SM (at most _MAX_STAGES); a number: used as is."""

    block_m: int  # pairs per chunk (rows of every shrink/expand tile)
    block_c: int  # steer columns per shrink item
    block_k: int  # D step of the shrink's loop
    split_k: int  # shrink items along D (partials summed by the expand)
    block_d: int  # D columns per expand item
    block_r: int  # K*r step of the expand's loop
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int | None = None
    expand_stages: int | None = None
    programs_per_sm: int = 2  # persistent grid: this many programs per SM (at most the items)


_MAX_STAGES = 6
_SMEM_RESERVE = 1024 + 8192  # per program: the driver's 1 KB plus room for epilogue layout conversions
PLAN_BLOCK_P = 1024
PLAN_WARPS = 4
FIN_BLOCK_M = 16
FIN_BLOCK_D = 128
FIN_WARPS = 4
_SMALL_WEIGHTS = 2 << 20  # bytes of one steer's down (or up) under which the op is launch-latency bound
_SPLIT_K = 8  # the split over D for 16-pair chunks (half of it for bigger ones): one extra variant per bucket
# Pair buckets: (most pairs, BLOCK_M, expand BLOCK_D). Few buckets, few compiled variants.
_BUCKETS = ((16, 16, 64), (32, 32, 128), (1 << 62, 64, 128))


def _stage_budget(target: Target) -> int:
    """Shared memory for one program's pipeline buffers: two programs per SM."""
    return min(target.smem_per_block, target.smem_per_sm // 2) - _SMEM_RESERVE


def auto_stages(stage_bytes: int, target: Target) -> int:
    """Pipeline depth: Triton keeps (stages - 1) tiles in shared memory."""
    return max(2, min(_MAX_STAGES, 1 + _stage_budget(target) // max(1, stage_bytes)))


def shrink_stage_bytes(cfg: Config, h_size: int, w_size: int) -> int:
    return cfg.block_k * (cfg.block_m * h_size + cfg.block_c * w_size)


def expand_stage_bytes(cfg: Config, w_size: int) -> int:
    return cfg.block_r * (cfg.split_k * cfg.block_m * 4 + cfg.block_d * w_size)


@functools.lru_cache(maxsize=4096)
def pick_config(p: int, d: int, max_cols: int, target: Target, h_size: int = 2, w_size: int = 2,
                 col_align: int = 16, multi: bool = False) -> Config:
    """The launch config for P = B*S pairs, hidden size D, a bank whose largest steer spans max_cols = K*r
    columns, h_size / w_size bytes per element of h and of the weights, steers' columns aligned to col_align
    elements, and `multi` (S > 1: rows may name several steers). Estimates until a GPU sweep says otherwise:

    - BLOCK_M and the expand's BLOCK_D from P's bucket: up to 16 pairs 16 (BLOCK_D 64), up to 32 pairs 32,
      else 64 (BLOCK_D 128).
    - Shrink columns BLOCK_C = 2 * BLOCK_M. Where the chunks times the column tiles of one steer on every row
      give fewer work items than 3/4 of the SMs: BLOCK_C narrowed to BLOCK_M (at least 16), and a split over D
      into 8 partials (16-pair chunks) or 4, only for P <= 16 or a largest steer of 2 MB or less, and only
      for D >= 128 x the split.
    - Shrink D step BLOCK_K: 64 under a split or for fp32 weights (32 for fp32 weights with 64-pair chunks),
      else 256 for 16-pair chunks and 128 for bigger; 32 where rows cannot load in 16-byte vectors; halved
      (down to 32) while a pipeline stage takes more than half the stage budget.
    - Expand: under a split, BLOCK_D 64 for 64-pair chunks and 128 for smaller; 64 for fp32 weights from
      32-pair chunks. BLOCK_R (the K*r step) 32 for fp32 weights or 64-pair chunks under a split, else 64.
      With `multi`, for 64-pair chunks or under a split, BLOCK_D at most 64 (64-pair chunks) and BLOCK_R 32.
      BLOCK_R halved (down to 16) while a stage takes more than half the budget.
    - Warps: the shrink's 8 from 64 x 64 tiles, the expand's 8 from 32-pair chunks or under a split, else 4.
    """
    block_m, block_d = next((m, bd) for top, m, bd in _BUCKETS if p <= top)
    enough = (3 * target.num_sms) // 4
    stage_cap = _stage_budget(target) // 2  # three stages at least
    block_c = 2 * block_m  # not narrowed for small steers: masked columns cost no bytes, and variants add up
    chunks = triton.cdiv(p, block_m)
    split_k = 1
    if chunks * triton.cdiv(max_cols, block_c) < enough:
        small = d * max_cols * w_size <= _SMALL_WEIGHTS
        split = _SPLIT_K if block_m == 16 else _SPLIT_K // 2  # 4 for bigger chunks: the expand's registers
        if (p <= 16 or small) and d >= 2 * 64 * split:
            split_k = split
        block_c = max(16, min(block_c, block_m))
    block_k = 64 if split_k > 1 or w_size == 4 else 256 if block_m == 16 else 128
    if w_size == 4 and block_m == 64:
        block_k = 32
    if col_align * w_size < 16 or d % (16 // h_size):
        block_k = 32
    while block_k > 32 and block_k * (block_m * h_size + block_c * w_size) > stage_cap:
        block_k //= 2
    if split_k > 1:
        block_d = 64 if block_m == 64 else 128
    block_r = 32 if w_size == 4 or (split_k > 1 and block_m == 64) else 64
    if w_size == 4 and block_m >= 32:  # fp32 weights: the tf32 splits of both operands need the registers
        block_d = 64
    if multi and (block_m == 64 or split_k > 1):  # S > 1: the expand's second (fp32 partial) store too
        block_d, block_r = min(block_d, 64 if block_m == 64 else 128), 32
    while block_r > 16 and block_r * (split_k * block_m * 4 + block_d * w_size) > stage_cap:
        block_r //= 2
    return Config(block_m, block_c, block_k, split_k, block_d, block_r,
                   shrink_warps=8 if block_m * block_c >= 64 * 64 else 4,
                   expand_warps=8 if block_m >= 32 or split_k > 1 else 4)
