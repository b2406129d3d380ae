"""The runtime steer registry (list, load, unload over HTTP) and the Prometheus metrics, on the
session's steer server (started with --allow-runtime-updates and --steer-bound beta=20)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI
from helpers import PROMPTS, client, complete, metric, random_steer

from vllm_steer import embedding_fingerprint


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=300)


def test_list_steers(servers):
    listed = {s["name"]: s for s in httpx.get(servers["steer"].url + "/steers", timeout=30).json()["data"]}
    assert set(listed) >= {"alpha", "beta"}
    assert listed["alpha"]["dim_names"] == ["alpha", "bias"] and listed["alpha"]["bias_dims"] == {"bias": 1.0}
    assert listed["alpha"]["epsilon"] == 1e-3 and listed["alpha"]["base_model"] == "SmolLM2-135M-Instruct"
    assert listed["alpha"]["max_abs_value"] == 50 and listed["beta"]["max_abs_value"] == 20
    assert listed["alpha"]["fingerprint"] is True


def test_per_steer_bound_is_enforced(servers):
    complete(servers["steer"], PROMPTS[0], {"steer_beta": 20}, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"beyond the allowed range \[-20.0, 20.0\]"):
        complete(servers["steer"], PROMPTS[0], {"steer_beta": 21}, max_tokens=2)
    complete(servers["steer"], PROMPTS[0], {"steer_alpha": 21}, max_tokens=2)


def test_metrics_count_steered_and_rejected_requests(servers):
    s = servers["steer"]
    before = (metric(s, "vllm_steer_requests_total", steer="alpha"),
              metric(s, "vllm_steer_rejected_total", reason="unknown_steer"),
              metric(s, "vllm_steer_value_bucket", le="5.0", steer="alpha"))
    complete(s, PROMPTS[0], {"steer_alpha": 3}, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        complete(s, PROMPTS[0], {"steer_nothing": 3}, max_tokens=2)
    after = (metric(s, "vllm_steer_requests_total", steer="alpha"),
             metric(s, "vllm_steer_rejected_total", reason="unknown_steer"),
             metric(s, "vllm_steer_value_bucket", le="5.0", steer="alpha"))
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1 and after[2] == before[2] + 1


@pytest.fixture
def gamma(tmp_path, output_embedding):
    path = tmp_path / "gamma.safetensors"
    random_steer(["gamma"], 16, 7, embedding_fingerprint(output_embedding)).save(path)
    return str(path)


def test_load_use_and_unload_a_steer(servers, gamma, tmp_path):
    s = servers["steer"]
    alpha_before = complete(s, PROMPTS[1], {"steer_alpha": 5}).choices[0].text
    unsteered = complete(s, PROMPTS[1], None).choices[0].text
    with pytest.raises(openai.BadRequestError, match="unknown steer 'gamma'"):
        complete(s, PROMPTS[1], {"steer_gamma": 5})

    r = post(s, "/load_steer", {"name": "gamma", "path": gamma, "max_abs_value": 8})
    assert r.status_code == 200, r.text
    gamma_text = complete(s, PROMPTS[1], {"steer_gamma": 5}).choices[0].text
    assert gamma_text != unsteered
    # Loading re-lays the table: the steers already there are unchanged.
    assert complete(s, PROMPTS[1], {"steer_alpha": 5}).choices[0].text == alpha_before
    with pytest.raises(openai.BadRequestError, match="beyond"):
        complete(s, PROMPTS[1], {"steer_gamma": 9})

    # Refused without touching the running steers: a duplicate, a corrupt file, another
    # model's steer (the workers check the fingerprint), a steer of the wrong hidden size.
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    random_steer(["x"], 4, 0, embedding_fingerprint(torch.randn(49152, 576))).save(tmp_path / "other.safetensors")
    from vllm_steer import SteerFile

    SteerFile.create(torch.randn(1, 64, 4), torch.randn(1, 64, 4), dim_names=["x"]).save(tmp_path / "d64.safetensors")
    for body, message in [({"name": "gamma", "path": gamma}, "already loaded"),
                          ({"name": "bad", "path": str(tmp_path / "corrupt.safetensors")},
                           "not a valid steer file: it is not a safetensors file"),
                          ({"name": "bad", "path": str(tmp_path / "other.safetensors")},
                           "does not fit this model's output embedding (its embedding fingerprint differs)"),
                          ({"name": "bad", "path": str(tmp_path / "d64.safetensors")},
                           "not a valid steer file: its hidden size is not the model's"),
                          ({"name": "bad name", "path": gamma}, "letters, digits")]:
        r = post(s, "/load_steer", body)
        assert r.status_code == 400 and message in r.text, r.text
    assert complete(s, PROMPTS[1], {"steer_gamma": 5}).choices[0].text == gamma_text
    assert complete(s, PROMPTS[1], {"steer_alpha": 5}).choices[0].text == alpha_before
    assert "bad" not in {x["name"] for x in httpx.get(s.url + "/steers").json()["data"]}

    r = post(s, "/unload_steer", {"name": "gamma"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.BadRequestError, match="unknown steer 'gamma'"):
        complete(s, PROMPTS[1], {"steer_gamma": 5})
    assert post(s, "/unload_steer", {"name": "gamma"}).status_code == 404
    assert complete(s, PROMPTS[1], {"steer_alpha": 5}).choices[0].text == alpha_before


def test_unload_while_a_request_is_in_flight(servers, gamma):
    """A request admitted with a steer keeps it to the end even if the steer is unloaded
    meanwhile: its text equals the same request run with the steer loaded throughout."""
    s = servers["steer"]
    assert post(s, "/load_steer", {"name": "gamma", "path": gamma}).status_code == 200
    xargs, prompt = {"steer_gamma": -6}, PROMPTS[2]
    expected = complete(s, prompt, xargs, max_tokens=120).choices[0].text

    async def stream_while_unloading() -> str:
        aclient = openai.AsyncOpenAI(base_url=s.url, api_key="none", max_retries=0)
        model = (await aclient.models.list()).data[0].id
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=120, temperature=0,
                                                  stream=True, extra_body={"vllm_xargs": xargs})
        pieces, unloaded = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            if len(pieces) == 5:
                unloaded = asyncio.create_task(asyncio.to_thread(post, s, "/unload_steer", {"name": "gamma"}))
        await aclient.close()
        assert (await unloaded).status_code == 200
        return "".join(pieces)

    assert asyncio.run(stream_while_unloading()) == expected
    with pytest.raises(openai.BadRequestError, match="unknown steer 'gamma'"):
        complete(s, prompt, xargs)


def test_load_and_unload_routes_need_the_operator_opt_in(monkeypatch):
    from vllm_steer.plugin import SteerEndpoints
    from vllm_steer.serving.config import RUNTIME_UPDATES_ENV

    def paths(allowed: bool) -> set[str]:
        if allowed:
            monkeypatch.setenv(RUNTIME_UPDATES_ENV, "1")
        else:
            monkeypatch.delenv(RUNTIME_UPDATES_ENV, raising=False)
        app = FastAPI()
        SteerEndpoints().attach_router(app)
        return {route.path for route in app.routes}

    assert {"/v1/steers"} <= paths(False) and not {"/v1/load_steer", "/v1/unload_steer"} & paths(False)
    assert {"/v1/steers", "/v1/load_steer", "/v1/unload_steer"} <= paths(True)
    assert client  # the HTTP side is exercised above on the real server


def test_a_steer_loaded_again_under_a_retired_name():
    """An unloaded steer stays retired while requests admitted before hold it. Loading a new file
    under its name replaces it once nothing holds it, and is refused (changing nothing) while a
    request still does: that request would otherwise change steer mid-generation."""
    from types import SimpleNamespace

    from vllm_steer import SteerConfig
    from vllm_steer.serving.table import SteerTable
    from vllm_steer.steer.bank import CPU_STORAGE, SteerBank

    old, new = random_steer(["gamma"], 4, 1, None), random_steer(["gamma"], 4, 2, None)
    alpha = random_steer(["alpha"], 4, 3, None)
    both = SteerConfig({"alpha": "a.safetensors", "gamma": "g.safetensors"})
    table = SteerTable(both, SteerBank.pack({"alpha": alpha, "gamma": old}, CPU_STORAGE), 4, torch.device("cpu"))
    table.set(0, SimpleNamespace(extra_args={"steer_gamma": 3.0}))
    unloaded = table.with_steers(both.without_steer("gamma"), {})
    unloaded.carry_rows_from(table)
    assert unloaded.retired.keys() == {"gamma"} and unloaded.in_use("gamma")

    with pytest.raises(ValueError, match="'gamma' was unloaded and requests admitted before that still use it"):
        unloaded.with_steers(both, {"gamma": new})
    unloaded.clear(0)
    reloaded = unloaded.with_steers(both, {"gamma": new})
    assert reloaded.bank.names.count("gamma") == 1 and not reloaded.retired
    down, _ = reloaded.bank.weights("gamma")
    assert torch.equal(down, new.projector1[0].float())
