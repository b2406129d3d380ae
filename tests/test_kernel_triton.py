"""The Triton steer kernel and the torch op against a float64 reference of the formula.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set below before Triton is imported): a correctness check, meaningless for speed. On a CUDA
device (benchmarks/gpu_check.sh) the same tests run the compiled kernels for real.
Importable from a raw checkout (no install) so the GPU machine can run it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kernels` from the source tree

from kernels.steer_torch import steer_hidden_torch  # noqa: E402
from kernels.steer_triton import steer_hidden_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances relative to the size of the output row: fp32 differs from float64 only by
# accumulation order; bf16/fp16 outputs are rounded to 8/11 significant bits (about 2^-8 and
# 2^-11 relative), plus the kernel's half-precision operands on the GPU's tensor cores.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# (B, D, R, K): ragged, not powers of two; B=70 spans two row blocks, R=1 and K=1 edge cases;
# every third row from row 1 on is unsteered.
SHAPES = [(1, 67, 33, 1), (2, 67, 33, 1), (7, 130, 200, 3), (33, 96, 1, 1), (70, 40, 75, 5), (5, 576, 130, 2)]


def reference(h, down, up, col_dim, values):
    h64 = h.double()
    return h64 + ((h64 @ down.double()) * values.double()[:, col_dim]) @ up.double()


def inputs(b, d, r, k, dtype, weight_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, d, generator=g)
    down = torch.randn(d, r, generator=g) / d**0.5
    up = torch.randn(r, d, generator=g) / r**0.5
    col_dim = torch.randint(0, k, (r,), generator=g)
    values = torch.randn(b, k, generator=g) * 0.5
    values[1::3] = 0.0  # every third row unsteered
    return (h.to(DEVICE, dtype), down.to(DEVICE, weight_dtype), up.to(DEVICE, weight_dtype), col_dim.to(DEVICE),
            values.to(DEVICE))


def check(out, h, down, up, col_dim, values):
    ref = reference(h, down, up, col_dim, values)
    assert out.dtype == h.dtype and out.shape == h.shape
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite elements"
    zero_rows = (values == 0).all(dim=1)
    assert torch.equal(out[zero_rows], h[zero_rows]), "unsteered rows must be bit-identical"
    scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    err = ((out.double() - ref).abs() / scale).max().item()
    assert err <= RTOL[h.dtype], f"relative error {err} > {RTOL[h.dtype]}"
    # The steered rows really moved (so the comparison above has something to compare).
    if (~zero_rows).any():
        assert not torch.equal(out[~zero_rows], h[~zero_rows])


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-D{d}-R{r}-K{k}" for b, d, r, k in SHAPES])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_triton_kernel_matches_float64(shape, dtype, weight_dtype):
    args = inputs(*shape, dtype, weight_dtype, seed=sum(shape))
    out = torch.full_like(args[0], float("nan"))  # poisoned: every element must be written
    steer_hidden_triton(*args, out=out)
    check(out, *args)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=[f"B{b}-D{d}-R{r}-K{k}" for b, d, r, k in SHAPES[:3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_op_matches_float64(shape, dtype):
    args = inputs(*shape, dtype, torch.float32, seed=1 + sum(shape))
    check(steer_hidden_torch(*args), *args)


def test_all_rows_unsteered_is_a_copy():
    h, down, up, col_dim, values = inputs(9, 50, 20, 2, torch.float32, torch.float32, seed=3)
    values.zero_()
    out = steer_hidden_triton(h, down, up, col_dim, values)
    assert torch.equal(out, h) and out.data_ptr() != h.data_ptr()


def test_row_values_gathered_by_slot():
    """MRV2 hands the kernel row_values gathered through a slot map: a non-contiguous-looking
    source is fine once gathered (the gather makes it contiguous)."""
    h, down, up, col_dim, values = inputs(6, 48, 24, 3, torch.float32, torch.float32, seed=4)
    table = torch.cat([values, torch.zeros(1, 3, device=DEVICE)])
    slots = torch.tensor([2, 0, -1, 5, 1, -1], device=DEVICE)
    gathered = table[slots]
    check(steer_hidden_triton(h, down, up, col_dim, gathered), h, down, up, col_dim, gathered)
