"""The steer math (the formula module, SteerBank + the torch op) against the paper's formula
computed independently in float64, and the request values. Pure torch, no vLLM."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_steer import SteerFile, SteerRequestError, parse_steer_args, steer_args
from vllm_steer.steer.bank import CPU_STORAGE, KERNEL_STORAGE, BankStorage, SteerBank
from vllm_steer.steer.formula import steered_hidden
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


def bank_rows(bank, requests, slots=4):
    """The per-row (steers [B, S], values [B, S, Kmax]) the serving table would hold."""
    steers = torch.full((len(requests), slots), -1, dtype=torch.int32)
    values = torch.zeros(len(requests), slots, bank.max_dims)
    for i, req in enumerate(requests):
        for s, (n, vals) in enumerate(zip(*bank.row_entries(req), strict=True)):
            steers[i, s] = n
            values[i, s, :len(vals)] = torch.tensor(vals)
    return steers, values


def check_against_formula(bank, steers_by_name, requests, h, out, tol=1e-5):
    for i, req in enumerate(requests):
        expected = formula(h[i], [(steers_by_name[n], v) for n, v in req.items()])
        torch.testing.assert_close(out[i].double(), expected, rtol=tol, atol=tol)
        # The formula module's own form (projectors, one steer at a time) is the same function.
        via_formula = h[i:i + 1].double()
        for n, v in req.items():
            s = steers_by_name[n]
            via_formula = via_formula + steered_hidden(h[i:i + 1].double(), torch.tensor([v]).double(),
                                                       s.projector1.double(), s.projector2.double(),
                                                       s.header.epsilon) - h[i:i + 1].double()
        torch.testing.assert_close(via_formula[0], expected, rtol=1e-12, atol=1e-12)
        if not any(any(v) for v in req.values()):
            assert torch.equal(out[i], h[i]), "a row that names no steer (or only zeros) must come back as it was"
        else:
            assert not torch.equal(out[i], h[i])


REQUESTS = [{}, {"a": [5.0, 1.0]}, {"b": [-2.0]}, {"a": [-3.0, 1.0], "b": [4.0]}, {"a": [0.0, 0.0]},
            {"b": [1.0], "a": [2.0, 0.0]}]


@pytest.mark.parametrize("dense", [False, True])
def test_bank_matches_formula_per_row_with_mixed_steers(dense):
    """Factored (low rank) and, off CUDA, dense W_k (rank above D/2): the same function."""
    rank_a, rank_b = (30, 40) if dense else (7, 3)
    a = steer(["a", "bias"], rank_a, 0, 1e-3, bias_dims={"bias": 1.0})
    b = steer(["b"], rank_b, 1, 5e-3)
    bank = SteerBank.pack({"a": a, "b": b}, BankStorage(flat=True, dense=dense))
    assert all((e.up_start < 0) == dense for e in bank.entries)
    h = torch.randn(len(REQUESTS), D)
    out = bank.steer(h, *bank_rows(bank, REQUESTS))
    check_against_formula(bank, {"a": a, "b": b}, REQUESTS, h, out)


def test_low_rank_steers_stay_factored_and_cuda_banks_never_densify():
    low = SteerBank.pack({"a": steer(["a", "bias"], 19, 0, 1e-3, bias_dims={"bias": 1.0})}, CPU_STORAGE)
    assert low.entries[0].up_start == 0 and low.total_rank == 2 * 19
    high = {"a": steer(["a"], 30, 0, 1e-3)}
    assert BankStorage.for_device("cpu") == CPU_STORAGE and BankStorage.for_device("cuda") == KERNEL_STORAGE
    assert SteerBank.pack(high, CPU_STORAGE).entries[0].up_start == -1
    assert SteerBank.pack(high, BankStorage.for_device("cuda")).entries[0].up_start == 0
    assert SteerBank.pack(high, BankStorage(flat=True, dense=False)).entries[0].up_start == 0
    with pytest.raises(ValueError, match="cannot be served on cuda"):
        SteerBank.pack(high, CPU_STORAGE).placed("cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unsteered_rows_are_bit_identical(dtype):
    bank = SteerBank.pack({"a": steer(["a"], 5, 0, 1e-1)}, CPU_STORAGE)
    h = torch.randn(4, D, dtype=dtype)
    h[0, :3] = torch.tensor([-0.0, float("inf"), float("-inf")])
    steers, values = bank_rows(bank, [{}, {"a": [3.0]}, {"a": [0.0]}, {"a": [-1.0]}])
    out = bank.steer(h, steers, values)
    assert out.dtype == dtype
    as_int = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(out[0].view(as_int), h[0].view(as_int)) and torch.equal(out[2].view(as_int), h[2].view(as_int))
    assert not torch.equal(out[1], h[1])


def test_many_steers_each_row_its_own_and_unused_steers_never_read():
    """60 steers loaded (factored and dense, K 1-3), rows on steers that share nothing, composed
    rows, unsteered rows. The steers no row names have NaN weights: any read of them would poison
    the output, so a clean result shows a step touches only the steers its rows use."""
    steers = {}
    for i in range(60):
        k = 1 + i % 3
        names = [f"s{i}"] + [f"d{j}" for j in range(1, k)]
        steers[f"s{i}"] = steer(names, 4 if i % 5 else 30, 10 + i, 1e-3 * (1 + i % 4))
    bank = SteerBank.pack(steers, CPU_STORAGE)
    g = torch.Generator().manual_seed(5)
    used = [f"s{i}" for i in range(0, 60, 3)]
    requests = []
    for j in range(24):
        if j % 6 == 5:
            requests.append({})
            continue
        names = [used[j % len(used)]] + ([used[(j * 7 + 3) % len(used)]] if j % 4 == 0 else [])
        requests.append({n: (torch.randn(steers[n].header.num_dims, generator=g) * 3).tolist() for n in names})
    unused = [n for n in steers if n not in used]
    for n in unused:
        down, up = bank.weights(n)
        down.fill_(float("nan"))
        if up is not None:
            up.fill_(float("nan"))
    h = torch.randn(len(requests), D, generator=g)
    out = bank.steer(h, *bank_rows(bank, requests))
    assert torch.isfinite(out).all()
    check_against_formula(bank, steers, requests, h, out)


def test_flat_bank_gemm_and_bag_paths_match_the_formula():
    """The CPU bank's flat layout (each block at a multiple of its width, mixed widths, factored and
    dense): steers named by many pairs (the GEMM path) and by few (the embedding bags) in one step,
    a row naming one steer twice, unsteered rows; against float64 and against the [D, C] bank the
    Triton kernel reads (the reference torch op). Unused steers are NaN."""
    from vllm_steer.kernels.steer_torch import GEMM_PAIRS

    specs = {"a": (["a", "bias"], 7), "b": (["b"], 3), "c": (["c", "x", "y"], 30), "d": (["d"], 1),
             "e": (["e", "f"], 4), "unused": (["u"], 5)}
    steers = {n: steer(names, r, 40 + i, 1e-3 * (1 + i)) for i, (n, (names, r)) in enumerate(specs.items())}
    flat = SteerBank.pack(steers, CPU_STORAGE)
    assert flat.storage.flat and flat.down.dim() == 1
    assert all(e.down_start % (e.num_dims * e.rank) == 0 for e in flat.entries)
    assert [e.up_start < 0 for e in flat.entries] == [False, False, True, False, False, False]
    g = torch.Generator().manual_seed(8)
    heavy = GEMM_PAIRS  # "a" and "c" reach the GEMM threshold, the rest stay bags
    requests = [{"a": (torch.randn(2, generator=g) * 3).tolist()} for _ in range(heavy)]
    requests += [{"c": (torch.randn(3, generator=g) * 3).tolist(), "b": [1.5]} for _ in range(heavy)]
    requests += [{"d": [2.0]}, {}, {"e": [1.0, -2.0], "a": [0.5, 1.0]}, {"b": [-4.0]}, {}]
    rows = SteerBank.pack(steers, KERNEL_STORAGE)
    for n in ("unused",):
        for t in (*flat.weights(n), *rows.weights(n)):
            t.fill_(float("nan"))
    h = torch.randn(len(requests), D, generator=g)
    steer_idx, values = bank_rows(flat, requests)
    steer_idx[-3, 2] = steer_idx[-3, 0]  # "e" twice in one row: its values count twice
    values[-3, 2] = values[-3, 0]
    out = flat.steer(h, steer_idx, values)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, rows.steer(h, steer_idx, values), rtol=1e-5, atol=1e-5)
    requests[-3] = {"e": [2.0, -4.0], "a": [0.5, 1.0]}
    check_against_formula(flat, steers, requests, h, out)


def test_repacked_keeps_rows_meaning_and_adds_steers():
    a = steer(["a", "bias"], 7, 0, 1e-3, bias_dims={"bias": 1.0})
    b = steer(["b"], 30, 1, 5e-3)
    c = steer(["c"], 5, 2, 2e-3)
    bank = SteerBank.pack({"a": a, "b": b}, CPU_STORAGE)
    grown = bank.repacked(["b"], {"c": c})
    assert grown.names == ["b", "c"] and grown.index == {"b": 0, "c": 1}
    requests = [{"b": [2.0]}, {"c": [-3.0], "b": [1.0]}, {}]
    h = torch.randn(3, D)
    out = grown.steer(h, *bank_rows(grown, requests))
    check_against_formula(grown, {"b": b, "c": c}, requests, h, out)
    assert grown.nbytes("b") == bank.nbytes("b") == D * D * 4  # dense as stored, copied as it was


def test_bank_refuses_mixed_hidden_sizes():
    other = SteerFile.create(torch.randn(1, D + 1, 2), torch.randn(1, D + 1, 2), dim_names=["x"])
    with pytest.raises(ValueError, match="hidden size"):
        SteerBank.pack({"a": steer(["a"], 2, 0, 1e-3), "x": other}, CPU_STORAGE)


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


def test_a_request_composes_at_most_the_servers_limit():
    xargs = {"steer_tone": 1, "steer_topic": [2]}
    assert len(parse_steer_args(xargs, CATALOG, 10, max_steers=2)) == 2
    with pytest.raises(SteerRequestError, match="at most 1 in one request") as err:
        parse_steer_args(xargs, CATALOG, 10, max_steers=1)
    assert err.value.reason == "too_many_steers"
