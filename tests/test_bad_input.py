"""Malformed steer requests get a 400 naming the problem and the server keeps serving: a table
of every malformed `vllm_xargs` tried, what each gets (and who answers: the plugin, or vLLM's
own request model), then a property-based test over arbitrary `vllm_xargs` dicts.

Requests go over HTTP as raw JSON (httpx, and Python's json with allow_nan, which writes NaN
and Infinity literals: vLLM's JSON parser accepts them, the openai client refuses to send
them). Uses the session's steer server: steers alpha (K=2: alpha, bias held at 1) and beta
(K=1, bound 20 by the operator); every other steer's bound is 50.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from vllm_steer import SteerFile, SteerRequestError, parse_steer_args

PROMPT = "I opened the letter from my landlord and"
UNSTEERED: dict = {}


@dataclass(frozen=True)
class Case:
    """One malformed (or surprising) request. `xargs` is the vllm_xargs value (any JSON value),
    or a str of raw JSON text for it; `extra` are other top-level fields. A 200 case names the
    request it must equal (`same_as`: vllm_xargs, {} for unsteered), or None to only check it
    is answered."""

    id: str
    xargs: Any
    status: int
    message: str = ""
    same_as: dict | None = None
    extra: dict = field(default_factory=dict)


PLUGIN = "the plugin"
VLLM = "vLLM's request model"

CASES: list[Case] = [
    # -- types (the plugin's checks, or vLLM's own pydantic model of vllm_xargs)
    Case("string", {"steer_alpha": "3"}, 400, "steer_alpha must be a number or a list of numbers, got the string '3'"),
    Case("empty string", {"steer_alpha": ""}, 400, "got the string ''"),
    Case("string nan", {"steer_beta": "nan"}, 400, "got the string 'nan'"),
    Case("string in list", {"steer_alpha": [1, "x"]}, 400, "steer_alpha[1] must be a number, got str 'x'"),
    Case("null", {"steer_alpha": None}, 400, "body.vllm_xargs.steer_alpha"),
    Case("null in list", {"steer_alpha": [1, None]}, 400, "body.vllm_xargs.steer_alpha"),
    Case("object", {"steer_alpha": {"alpha": 1}}, 400, "body.vllm_xargs.steer_alpha"),
    Case("nested list", {"steer_alpha": [[1, 2]]}, 400, "body.vllm_xargs.steer_alpha"),
    Case("vllm_xargs a list", [{"steer_alpha": 1}], 400, "Input should be a valid dictionary"),
    Case("vllm_xargs a string", "\"steer_alpha=1\"", 400, "Input should be a valid dictionary"),
    # JSON true/false arrive as 1/0 (vLLM's request model narrows them before the plugin sees them).
    Case("true is 1", {"steer_beta": True}, 200, same_as={"steer_beta": 1}),
    Case("[true, false] is [1, 0]", {"steer_alpha": [True, False]}, 200, same_as={"steer_alpha": [1, 0]}),
    # -- NaN and infinity (raw JSON literals; 1e400 overflows to inf when parsed)
    Case("NaN", "{\"steer_alpha\": NaN}", 400, "steer_alpha must be finite, got nan"),
    Case("Infinity", "{\"steer_beta\": Infinity}", 400, "steer_beta must be finite, got inf"),
    Case("-Infinity in list", "{\"steer_alpha\": [1, -Infinity]}", 400, "steer_alpha[1] must be finite, got -inf"),
    Case("NaN in list", "{\"steer_alpha\": [NaN, 1]}", 400, "steer_alpha[0] must be finite, got nan"),
    Case("1e400", "{\"steer_alpha\": 1e400}", 400, "steer_alpha must be finite, got inf"),
    Case("-1e400 in list", "{\"steer_beta\": [-1e400]}", 400, "steer_beta[0] must be finite, got -inf"),
    # -- huge values
    Case("1e300", {"steer_alpha": 1e300}, 400, "steer_alpha = 1e+300 is beyond the allowed range [-50.0, 50.0]"),
    Case("just above the bound", {"steer_alpha": 50.000001}, 400, "beyond the allowed range [-50.0, 50.0]"),
    Case("the bound itself", {"steer_alpha": -50}, 200),
    Case("beyond beta's own bound", {"steer_beta": 20.5}, 400, "beyond the allowed range [-20.0, 20.0]"),
    Case("beta's bound itself", {"steer_beta": [20]}, 200),
    Case("bias dim beyond the bound", {"steer_alpha": [1, 1e6]}, 400, "steer_alpha[1] = 1000000.0 is beyond"),
    Case("2**63", {"steer_alpha": 2**63}, 400, "steer_alpha = 9223372036854775808 is beyond the allowed range"),
    Case("10**30 (vLLM's int64 check)", {"steer_alpha": 10**30}, 400, "extra_args integers must be between"),
    Case("-2**63-1 (vLLM's int64 check)", {"steer_beta": -(2**63) - 1}, 400, "extra_args integers must be between"),
    # -- tiny values: accepted; below float32's range they are exactly the unsteered model
    Case("1e-300", {"steer_beta": 1e-300}, 200, same_as=UNSTEERED),
    Case("5e-324", {"steer_beta": 5e-324}, 200, same_as=UNSTEERED),
    Case("-0.0", {"steer_beta": -0.0}, 200, same_as=UNSTEERED),
    Case("[1e-300, 0]", {"steer_alpha": [1e-300, 0]}, 200, same_as=UNSTEERED),
    Case("1e-300 keeps the bias dim", {"steer_alpha": 1e-300}, 200, same_as={"steer_alpha": 0}),
    # -- names
    Case("unknown name", {"steer_nope": 1}, 400, "unknown steer 'nope' (vllm_xargs key 'steer_nope'); loaded steers:"),
    Case("empty name", {"steer_": 1}, 400, "unknown steer ''"),
    Case("names are case-sensitive", {"steer_ALPHA": 1}, 400, "unknown steer 'ALPHA'"),
    Case("trailing space", {"steer_alpha ": 1}, 400, "unknown steer 'alpha '"),
    Case("10k-character name", {"steer_" + "x" * 10_000: 1}, 400, "unknown steer 'xxxx"),
    # Not steer keys at all: left to their owners, so they steer nothing (like any unknown key).
    Case("Steer_alpha is not a steer key", {"Steer_alpha": 5}, 200, same_as=UNSTEERED),
    Case("steer-alpha is not a steer key", {"steer-alpha": 5}, 200, same_as=UNSTEERED),
    Case("alpha is not a steer key", {"alpha": 5}, 200, same_as=UNSTEERED),
    # -- wrong lengths
    Case("empty list", {"steer_alpha": []}, 400, "steer_alpha expects a number or a list of 2 numbers "
         "(alpha, bias), got a list of 0"),
    Case("empty list, K=1", {"steer_beta": []}, 400, "got a list of 0"),
    Case("too short", {"steer_alpha": [1]}, 400, "got a list of 1"),
    Case("too long", {"steer_alpha": [1, 2, 3]}, 400, "got a list of 3"),
    Case("too long, K=1", {"steer_beta": [1, 2]}, 400, "got a list of 2"),
    Case("10000 numbers", {"steer_alpha": [0.5] * 10_000}, 400, "got a list of 10000"),
    # -- very many steers in one request
    Case("1000 unknown steers", {f"steer_s{i}": 1 for i in range(1000)}, 400, "unknown steer 's0'"),
    Case("one good steer, 999 unknown", {"steer_alpha": 3, **{f"steer_s{i}": 1 for i in range(999)}}, 400,
         "unknown steer 's0'"),
    Case("1000 other keys and a steer", {**{f"other_{i}": i for i in range(1000)}, "steer_alpha": 4}, 200,
         same_as={"steer_alpha": 4}),
    # Duplicate keys in raw JSON: the last one wins (Python's JSON parser).
    Case("duplicate key, bad last", "{\"steer_beta\": 3, \"steer_beta\": \"x\"}", 400, "got the string 'x'"),
    Case("duplicate key, good last", "{\"steer_beta\": \"x\", \"steer_beta\": 3}", 200, same_as={"steer_beta": 3}),
    # -- keys vLLM itself reads from vllm_xargs / extra_args
    # kv_transfer_params: vLLM's request model refuses an object in vllm_xargs; any other value
    # reaches vLLM's output processor, which calls .get() on it: vLLM 0.32 answers 500 with an
    # empty message (its own bug, with or without the plugin; the server keeps serving).
    Case("kv_transfer_params object", {"kv_transfer_params": {"do_remote_prefill": True}}, 400,
         "body.vllm_xargs.kv_transfer_params"),
    Case("kv_transfer_params string (vLLM: 500)", {"kv_transfer_params": "x"}, 500),
    Case("kv_transfer_params list (vLLM: 500)", {"kv_transfer_params": [1, 2], "steer_alpha": 3}, 500),
    Case("kv_transfer_params number (vLLM: 500)", {"kv_transfer_params": 5}, 500),
    # Without an EC connector nothing reads ec_transfer_params.
    Case("ec_transfer_params string", {"ec_transfer_params": "x", "steer_alpha": 4}, 200, same_as={"steer_alpha": 4}),
    # session_id: a non-empty string is the request's session id; anything else is ignored.
    Case("session_id string", {"session_id": "abc", "steer_alpha": 4}, 200, same_as={"steer_alpha": 4}),
    Case("session_id number", {"session_id": 5}, 200, same_as=UNSTEERED),
    Case("kv_cache_report_mode", {"kv_cache_report_mode": "full", "steer_beta": 5}, 200, same_as={"steer_beta": 5}),
    # The top-level kv_transfer_params object is copied into extra_args next to the steer.
    Case("top-level kv_transfer_params", {"steer_alpha": 4}, 200, same_as={"steer_alpha": 4},
         extra={"kv_transfer_params": {"do_remote_prefill": False}}),
    Case("vllm_xargs null", None, 200, same_as=UNSTEERED),
    Case("vllm_xargs empty", {}, 200, same_as=UNSTEERED),
]


def post(server, xargs: Any, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    """A greedy completion with `xargs` as vllm_xargs (a str is raw JSON text for it)."""
    xargs_json = xargs if isinstance(xargs, str) else json.dumps(xargs, allow_nan=True)
    head = json.dumps({"model": served_model(server), "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       **extra})
    body = head[:-1] + f', "vllm_xargs": {xargs_json}}}'
    return httpx.post(server.url + "/completions", content=body, headers={"content-type": "application/json"},
                      timeout=120)


_MODELS: dict[str, str] = {}


def served_model(server) -> str:
    if server.url not in _MODELS:
        _MODELS[server.url] = httpx.get(server.url + "/models", timeout=30).json()["data"][0]["id"]
    return _MODELS[server.url]


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def baseline(servers) -> dict[str, str]:
    """Greedy texts of well-formed requests, taken before any malformed one is sent."""
    return {json.dumps(x): text_of(post(servers["steer"], x)) for x in
            ({}, {"steer_alpha": 4}, {"steer_beta": 3}, {"steer_alpha": -3, "steer_beta": 5})}


def test_the_baseline_is_steered(baseline):
    assert len(set(baseline.values())) == len(baseline), baseline


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_request(servers, baseline, case: Case):
    server = servers["steer"]
    r = post(server, case.xargs, **case.extra)
    assert r.status_code == case.status, r.text[:2000]
    if case.status == 400:
        message = r.json()["error"]["message"]
        assert case.message in message, message[:2000]
    elif case.status == 200 and case.same_as is not None:
        expected = baseline.get(json.dumps(case.same_as)) or text_of(post(server, case.same_as))
        assert text_of(r) == expected
    elif case.status == 500:
        assert r.json()["error"]["code"] == 500
    # Whatever the answer, the server is still up.
    assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------------- property-based


def served_catalog(server, paths: dict[str, str]) -> tuple[dict, dict[str, float]]:
    """The steers the server serves now (GET /v1/steers, which shows no paths): headers read from the files
    the session started it with (`paths`), and bounds, for the model."""
    listing = httpx.get(server.url + "/steers", timeout=30).json()["data"]
    assert {s["name"] for s in listing} <= paths.keys(), "a steer loaded at run time was left loaded"
    catalog = {s["name"]: SteerFile.load(paths[s["name"]]).header for s in listing}
    assert {n: list(h.dim_names) for n, h in catalog.items()} == {s["name"]: s["dim_names"] for s in listing}
    return catalog, {s["name"]: s["max_abs_value"] for s in listing}


def accepted_by_vllm(xargs: dict[str, Any]) -> bool:
    """vLLM's own model of vllm_xargs: dict[str, str | int | float | list[str | int | float]]
    (booleans allowed, as ints), and every int within [-2**63, 2**64)."""

    def scalar(v: Any) -> bool:
        if isinstance(v, bool) or isinstance(v, (str, float)):
            return True
        return isinstance(v, int) and -(2**63) <= v < 2**64

    return all(all(scalar(x) for x in v) if isinstance(v, list) else scalar(v) for v in xargs.values())


def as_engine_sees_it(xargs: dict[str, Any]) -> dict[str, Any]:
    """JSON true/false become 1/0 before the plugin sees them."""

    def narrow(v: Any) -> Any:
        return int(v) if isinstance(v, bool) else v

    return {k: [narrow(x) for x in v] if isinstance(v, list) else narrow(v) for k, v in xargs.items()}


NAME_CHARS = string.ascii_letters + string.digits + "_-. "
numbers = st.one_of(st.integers(-60, 60), st.floats(-60, 60), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-(2**70), 2**70))
scalars = st.one_of(numbers, st.booleans(), st.none(), st.text(NAME_CHARS, max_size=6))
values = st.one_of(numbers, scalars, st.lists(numbers, max_size=3),
                   st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6))
keys = st.one_of(st.sampled_from(["steer_alpha", "steer_beta"]),
                 st.text(NAME_CHARS, max_size=8).map(lambda s: "steer_" + s),
                 st.text(NAME_CHARS, min_size=1, max_size=8).map(lambda s: "other_" + s))
xargs_dicts = st.dictionaries(keys, values, max_size=4)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(xargs=xargs_dicts)
def test_arbitrary_vllm_xargs(servers, served_steer_paths, xargs):
    """Every answer is a 200 or a 400 (never a 500, never a hang: 120 s timeout); a 400 carries
    a message; a 200 only for a request that is valid (vLLM's model of vllm_xargs, then
    parse_steer_args), and every valid request is a 200."""
    server = servers["steer"]
    catalog, bounds = served_catalog(server, served_steer_paths)
    valid = accepted_by_vllm(xargs)
    if valid:
        try:
            parse_steer_args(as_engine_sees_it(xargs), catalog, bounds)
        except SteerRequestError as e:
            note(f"parse_steer_args: {e}")
            valid = False
    r = post(server, xargs, max_tokens=1)
    note(f"{r.status_code}: {r.text[:500]}")
    assert r.status_code in (200, 400)
    if r.status_code == 400:
        assert r.json()["error"]["message"].strip()
    assert (r.status_code == 200) == valid


def test_server_answers_exactly_as_before(servers, baseline):
    """After all of the above, well-formed requests get exactly the texts they got first."""
    for xargs, text in baseline.items():
        assert text_of(post(servers["steer"], json.loads(xargs))) == text
