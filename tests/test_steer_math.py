"""The steer math (the formula module, SteerBank + the torch op) against the paper's formula
computed independently in float64, and the request values. Pure torch, no vLLM."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_steer import SteerFile, SteerRequestError, parse_steer_args, steer_args
from vllm_steer.kernels import steer_hidden_dense_torch, steer_hidden_torch
from vllm_steer.steer.formula import SteerBank, steered_hidden
from vllm_steer.steer.values import steer_values

D = 40


def steer(names, r, seed, eps, **kw):
    g = torch.Generator().manual_seed(seed)
    return SteerFile.create(torch.randn(len(names), D, r, generator=g), torch.randn(len(names), D, r, generator=g),
                            dim_names=names, epsilon=eps, **kw)


def formula(h, steers_and_values):
    """h + sum over steers of eps * sum_k s_k (h @ P1_k) @ P2_k^T, float64, one row at a time."""
    out = h.double().clone()
    for s, values in steers_and_values:
        for k, v in enumerate(values):
            out += s.header.epsilon * v * (h.double() @ s.projector1[k].double()) @ s.projector2[k].double().T
    return out


def test_bank_matches_formula_per_row_with_mixed_steers():
    a = steer(["a", "bias"], 7, 0, 1e-3, bias_dims={"bias": 1.0})
    b = steer(["b"], 3, 1, 5e-3)
    bank = SteerBank({"a": a, "b": b})
    requests = [{}, {"a": [5.0, 1.0]}, {"b": [-2.0]}, {"a": [-3.0, 1.0], "b": [4.0]}, {"a": [0.0, 0.0]}]
    h = torch.randn(len(requests), D)
    rows = torch.tensor([bank.row_values(r) for r in requests])
    out = steer_hidden_torch(h, bank.down, bank.up, bank.col_dim, rows)
    for i, req in enumerate(requests):
        expected = formula(h[i], [({"a": a, "b": b}[n], v) for n, v in req.items()])
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(out[i], h[i]) or not any(any(v) for v in req.values())
        # The formula module's own form (projectors, one steer at a time) is the same function.
        via_formula = h[i:i + 1].double()
        for n, v in req.items():
            s = {"a": a, "b": b}[n]
            via_formula = via_formula + steered_hidden(h[i:i + 1].double(), torch.tensor([v]).double(),
                                                       s.projector1.double(), s.projector2.double(),
                                                       s.header.epsilon) - h[i:i + 1].double()
        torch.testing.assert_close(via_formula[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_zero_rows_are_bit_identical(dtype):
    bank = SteerBank({"a": steer(["a"], 5, 0, 1e-1)})
    h = torch.randn(4, D, dtype=dtype)
    rows = torch.tensor([[0.0], [3.0], [0.0], [-1.0]])
    out = steer_hidden_torch(h, bank.down, bank.up, bank.col_dim, rows)
    assert out.dtype == dtype
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert not torch.equal(out[1], h[1])


def test_dense_form_matches_formula_and_the_factors():
    """Steers of rank above D/2 (here 30 and 40 of D = 40) are applied on CPU through the
    dense W_k = P1_k P2_k^T, one GEMM: the same function as the factored op and the formula,
    unsteered rows bit-identical. Low-rank banks keep the factors."""
    a = steer(["a", "bias"], 30, 0, 1e-3, bias_dims={"bias": 1.0})
    b = steer(["b"], 40, 1, 5e-3)
    bank = SteerBank({"a": a, "b": b})
    assert bank.dense_is_cheaper and bank.dense is None  # chosen when placed on a device
    requests = [{}, {"a": [5.0, 1.0]}, {"b": [-2.0]}, {"a": [-3.0, 1.0], "b": [4.0]}, {"a": [0.0, 0.0]}]
    h = torch.randn(len(requests), D)
    rows = torch.tensor([bank.row_values(r) for r in requests])
    factored = steer_hidden_torch(h, bank.down, bank.up, bank.col_dim, rows)
    assert bank.to("cpu").dense is not None and bank.dense.shape == (D, 3 * D)
    out = bank.steer(h, rows)
    torch.testing.assert_close(out, steer_hidden_dense_torch(h, bank.dense, rows), rtol=0, atol=0)
    torch.testing.assert_close(out, factored, rtol=1e-5, atol=1e-5)
    for i, req in enumerate(requests):
        expected = formula(h[i], [({"a": a, "b": b}[n], v) for n, v in req.items()])
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], h[0]) and torch.equal(out[4], h[4])
    assert not torch.equal(out[1], h[1])
    low = SteerBank({"a": steer(["a", "bias"], 19, 0, 1e-3, bias_dims={"bias": 1.0})}).to("cpu")
    assert not low.dense_is_cheaper and low.dense is None


def test_bank_refuses_mixed_hidden_sizes():
    other = SteerFile.create(torch.randn(1, D + 1, 2), torch.randn(1, D + 1, 2), dim_names=["x"])
    with pytest.raises(ValueError, match="hidden size"):
        SteerBank({"a": steer(["a"], 2, 0, 1e-3), "x": other})


CATALOG = {"tone": steer(["tone", "bias"], 2, 0, 1e-3, bias_dims={"bias": 1.0}).header,
           "topic": steer(["topic"], 2, 1, 1e-3).header}


def test_parse_numbers_lists_and_foreign_keys():
    parsed = parse_steer_args({"steer_tone": 3, "steer_topic": [-2], "other_plugin_key": "x"}, CATALOG, 10)
    assert parsed == {"tone": [3.0, 1.0], "topic": [-2.0]}
    assert parse_steer_args(None, CATALOG, 10) == {}
    assert steer_args(tone=3, topic=[1]) == {"steer_tone": 3, "steer_topic": [1]}


def test_a_number_sets_one_dim_and_keeps_the_bias_dims_on():
    header = CATALOG["tone"]
    assert steer_values(header, 5) == [5.0, 1.0]
    assert steer_values(header, 2, dim="bias") == [0.0, 2.0]
    assert steer_values(CATALOG["topic"], -1) == [-1.0]
    with pytest.raises(ValueError, match="no dim 'mood'"):
        steer_values(header, 1, dim="mood")


@pytest.mark.parametrize(
    "xargs,message",
    [({"steer_mood": 1}, "unknown steer 'mood'"), ({"steer_tone": [1]}, "list of 1"),
     ({"steer_tone": "1"}, "string"), ({"steer_tone": True}, "must be a number"),
     ({"steer_tone": None}, "must be a number"), ({"steer_tone": math.nan}, "finite"),
     ({"steer_tone": -math.inf}, "finite"), ({"steer_tone": 10.5}, "beyond"),
     ({"steer_tone": [1, {"a": 1}]}, "steer_tone[1]")],
)
def test_parse_rejects_with_a_clear_reason(xargs, message):
    with pytest.raises(SteerRequestError) as err:
        parse_steer_args(xargs, CATALOG, 10)
    assert message in str(err.value)
