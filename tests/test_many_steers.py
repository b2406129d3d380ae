"""Many steers on one server: a folder of 200 steers (factored and dense, K 1-3), batches in which
rows name steers that share nothing, compose several, or none, against the float64 formula and
against their solo runs; a steer loaded at run time; the per-request limit; the memory budget; and
the folder loader's refusals. Real vLLM (CPU build, float32) on the default model, through the
official `openai` client."""

from __future__ import annotations

import asyncio
import sys

import httpx
import openai
import pytest
from helpers import (
    ENGINE_ARGS,
    SERVER_ENV,
    complete,
    hf_steered_logprobs,
    load_dir_args,
    random_steer,
    refused_by_cli,
    run_alone,
    run_concurrently,
    token_ids,
)

from vllm_steer import SteerFile, embedding_fingerprint
from vllm_steer.testing import ServerProcess, steer_server_command

NUM_STEERS = 200
MAX_PER_REQUEST = 3
PROMPTS = ["The weather in the mountains this weekend", "I opened the letter from my landlord and",
           "Our team meeting this morning was", "My favourite thing about the city is"]


def folder_steer(i: int, fingerprint: dict) -> SteerFile:
    """Steer i of the folder: K 1-3 (with a bias dim when K > 1), rank 4-64, every 25th of rank 400
    (above D/2: stored dense on CPU)."""
    k = 1 + i % 3
    dims = [f"m{i}"] + (["bias"] if k > 1 else []) + (["extra"] if k > 2 else [])
    rank = 400 if i % 25 == 3 else (4, 16, 64)[i % 3]
    return random_steer(dims, rank, 1000 + i, fingerprint, bias_dims={"bias": 1.0} if k > 1 else {})


def served_bytes(steer: SteerFile) -> int:
    """What a steer takes in the CPU server's bank (float32): factors, or W_k when denser."""
    h = steer.header
    return 4 * h.num_dims * h.hidden_size * (h.hidden_size if 2 * h.rank > h.hidden_size else 2 * h.rank)


@pytest.fixture(scope="module")
def many(model_dir, output_embedding, tmp_path_factory):
    folder = tmp_path_factory.mktemp("many_steers")
    fp = embedding_fingerprint(output_embedding)
    steers = {f"m{i}": folder_steer(i, fp) for i in range(NUM_STEERS)}
    for name, steer in steers.items():
        steer.save(folder / f"{name}.safetensors")
    extra_dir = tmp_path_factory.mktemp("runtime")
    late = random_steer(["late", "bias"], 32, 77, fp, bias_dims={"bias": 1.0})
    late.save(extra_dir / "late.safetensors")
    huge = random_steer(["huge"], 2000, 78, fp)  # dense on CPU: 1.3 MiB served, over the 1 MiB left
    huge.save(extra_dir / "huge.safetensors")
    budget = sum(map(served_bytes, steers.values())) + served_bytes(late) + 2**20
    server = ServerProcess(
        steer_server_command(str(model_dir), {}, "--steer-dir", str(folder), "--allow-runtime-updates",
                             *load_dir_args(tmp_path_factory),
                             "--max-steers-per-request", str(MAX_PER_REQUEST), "--steer-memory-budget", str(budget),
                             *ENGINE_ARGS),
        tmp_path_factory.mktemp("many_logs") / "server.log", env=SERVER_ENV)
    with server:
        yield {"server": server, "steers": steers, "late": (late, extra_dir / "late.safetensors"),
               "huge": extra_dir / "huge.safetensors"}


def mixed_batch(steers: dict[str, SteerFile]) -> list[dict | None]:
    """Rows on steers that share nothing, rows composing two or three, unsteered rows, full K-vectors."""
    names = list(steers)
    batch: list[dict | None] = []
    for j in range(16):
        if j % 5 == 4:
            batch.append(None)
        elif j % 4 == 1:
            picked = [names[(3 * j + o) % len(names)] for o in range(1 + j % MAX_PER_REQUEST)]
            batch.append({f"steer_{n}": (-1) ** o * (3 + o) for o, n in enumerate(picked)})
        elif j % 4 == 2:
            n = names[(5 * j) % len(names)]
            batch.append({f"steer_{n}": [2.0 - 0.5 * k for k in range(steers[n].header.num_dims)]})
        else:
            batch.append({f"steer_{names[(7 * j) % len(names)]}": 5 if j % 2 else -5})
    return batch


async def steered_logprobs_concurrently(server, prompts_ids, batch, max_tokens=6):
    aclient = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
    model = (await aclient.models.list()).data[0].id

    async def one(ids, xargs):
        extra = {"return_tokens_as_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})}
        r = await aclient.completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0,
                                             logprobs=1, extra_body=extra)
        return r.choices[0]

    try:
        return await asyncio.gather(*(one(ids, x) for ids, x in zip(prompts_ids, batch, strict=True)))
    finally:
        await aclient.close()


def check_batch_against_formula(server, hf_model, steers, batch):
    model, tokenizer = hf_model
    prompts_ids = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(batch))]
    choices = asyncio.run(steered_logprobs_concurrently(server, prompts_ids, batch))
    worst = 0.0
    for ids, xargs, choice in zip(prompts_ids, batch, choices, strict=True):
        gen = token_ids(choice)
        ref = hf_steered_logprobs(model, ids + gen, steers, xargs or {})
        for i, (tok, lp) in enumerate(zip(gen, choice.logprobs.token_logprobs, strict=True)):
            worst = max(worst, abs(lp - ref[len(ids) - 1 + i, tok].item()))
    assert worst < 2e-3, f"largest |logprob difference| vs the HF formula: {worst}"


def test_mixed_batch_of_many_steers_matches_the_formula(many, hf_model):
    check_batch_against_formula(many["server"], hf_model, many["steers"], mixed_batch(many["steers"]))


def test_many_concurrent_requests_on_distinct_steers_equal_their_solo_runs(many):
    names = list(many["steers"])
    reqs = [(PROMPTS[i % len(PROMPTS)], {f"steer_{names[i]}": 5 if i % 2 else -5}, 6 + i % 9)
            for i in range(32)]
    reqs += [(PROMPTS[0], None, 10), (PROMPTS[1], {f"steer_{names[1]}": 4, f"steer_{names[2]}": -4}, 12)]
    batched = asyncio.run(run_concurrently(many["server"], reqs))
    alone = run_alone(many["server"], reqs)
    assert [b == a for b, a in zip(batched, alone, strict=True)] == [True] * len(reqs)
    assert len({t for t, (p, _, _) in zip(batched, reqs, strict=True) if p == PROMPTS[0]}) > 3  # steers differ


def test_a_load_under_traffic_keeps_every_request_its_values(many):
    """A steer loaded while 24 requests on other steers are decoding: each finishes with exactly
    the text it gets alone."""
    server, (_, path) = many["server"], many["late"]
    names = list(many["steers"])
    reqs = [(PROMPTS[i % len(PROMPTS)], {f"steer_{names[(11 * i) % len(names)]}": 4 if i % 2 else -4}, 24)
            for i in range(24)]

    async def traffic_and_load():
        load = asyncio.to_thread(httpx.post, server.url + "/load_steer",
                                 json={"name": "late", "path": str(path)}, timeout=300)
        texts, response = await asyncio.gather(run_concurrently(server, reqs), load)
        return texts, response

    texts, response = asyncio.run(traffic_and_load())
    assert response.status_code == 200, response.text
    assert texts == run_alone(server, reqs)


def test_a_steer_loaded_at_run_time_joins_mixed_batches(many, hf_model):
    late = many["late"][0]
    steers = {**many["steers"], "late": late}
    batch = mixed_batch(many["steers"])
    batch[0] = {"steer_late": 5}
    batch[6] = {"steer_late": [-3, 1], "steer_m0": 4}
    check_batch_against_formula(many["server"], hf_model, steers, batch)


def test_more_steers_than_the_limit_is_a_400(many):
    names = list(many["steers"])[:MAX_PER_REQUEST + 1]
    with pytest.raises(openai.BadRequestError, match=f"composes at most {MAX_PER_REQUEST} in one request"):
        complete(many["server"], PROMPTS[0], {f"steer_{n}": 1 for n in names})


def test_a_load_over_the_memory_budget_is_refused_and_changes_nothing(many):
    server = many["server"]
    xargs = {f"steer_{next(iter(many['steers']))}": 3}
    before = complete(server, PROMPTS[2], xargs).choices[0].text
    listed = httpx.get(server.url + "/steers", timeout=30).json()["data"]
    r = httpx.post(server.url + "/load_steer", json={"name": "huge", "path": str(many["huge"])}, timeout=300)
    assert r.status_code == 400 and "over the steer memory budget" in r.text, r.text
    assert httpx.get(server.url + "/steers", timeout=30).json()["data"] == listed
    assert complete(server, PROMPTS[2], xargs).choices[0].text == before
    with pytest.raises(openai.BadRequestError, match="unknown steer 'huge'"):
        complete(server, PROMPTS[2], {"steer_huge": 1})


# ---------------------------------------------------------------------------- the folder loader's refusals


def test_folder_refusals_before_vllm_starts(tmp_path, output_embedding, capsys, monkeypatch):
    """A bad file in the folder, a name given twice, a file name that is no steer name: refused
    by `vllm-steer serve` itself, naming the file, before any vLLM process starts."""
    def refused(args: list[str]) -> str:
        return refused_by_cli(["serve", "unused-model", *args], capsys, monkeypatch)

    fp = embedding_fingerprint(output_embedding)
    good = tmp_path / "good"
    good.mkdir()
    random_steer(["a"], 4, 0, fp).save(good / "a.safetensors")
    random_steer(["b"], 4, 1, fp).save(good / "b.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    random_steer(["a"], 4, 0, fp).save(bad / "ok.safetensors")
    (bad / "broken.safetensors").write_bytes(b"\x00 not a steer")
    err = refused(["--steer-dir", str(bad)])
    assert "broken.safetensors" in err and "not a readable safetensors file" in err
    err = refused(["--steer", f"a={good / 'b.safetensors'}", "--steer-dir", str(good)])
    assert "two steers named 'a'" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    random_steer(["a"], 4, 0, fp).save(odd / "my-steer.safetensors")
    err = refused(["--steer-dir", str(odd)])
    assert "my-steer.safetensors" in err and "--steer NAME=PATH" in err
    err = refused(["--steer-dir", str(tmp_path / "nowhere")])
    assert "not a folder" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
