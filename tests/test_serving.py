"""The plugin in the real vLLM engine (CPU build, float32) on the real default model, driven
through the OpenAI-compatible server with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_steer import SteerFile

PROMPTS = [
    "The weather in the mountains this weekend",
    "I opened the letter from my landlord and",
    "Our team meeting this morning was",
]
# Each a request's vllm_xargs: one steer, two composed, a full K-vector, negative values.
STEER_CASES = [
    {"steer_alpha": 5},
    {"steer_alpha": -5, "steer_beta": 3},
    {"steer_alpha": [2.5, -1.0]},
]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def complete(server, prompt, xargs=None, max_tokens=12, logprobs=None, **kw):
    extra = {"vllm_xargs": xargs} if xargs else {}
    if logprobs:
        extra["return_tokens_as_token_ids"] = True
    return client(server).completions.create(
        model=client(server).models.list().data[0].id, prompt=prompt, max_tokens=max_tokens, temperature=0,
        logprobs=logprobs, extra_body=extra, **kw)


def token_ids(choice) -> list[int]:
    return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


# ---------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def hf_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_steered_logprobs(model, ids: list[int], steers: dict[str, SteerFile], xargs: dict) -> torch.Tensor:
    """log_softmax((h + sum over steers of eps * sum_k s_k (h @ P1_k) @ P2_k^T) @ E^T), in
    float64, from HF transformers' post-norm hidden state: independent of the plugin's code."""
    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0].double()
        steered = h.clone()
        for key, value in xargs.items():
            steer = steers[key.removeprefix("steer_")]
            hd = steer.header
            if isinstance(value, list):
                s = value
            else:
                s = [hd.bias_dims.get(n, 0.0) for n in hd.dim_names]
                s[hd.primary_index] = value
            for k, s_k in enumerate(s):
                p1, p2 = steer.projector1[k].double(), steer.projector2[k].double()
                steered += hd.epsilon * s_k * (h @ p1) @ p2.T
        logits = steered @ model.get_output_embeddings().weight.double().T
        return torch.log_softmax(logits, dim=-1)


def served_vs_formula(server, model, tokenizer, steers: dict[str, SteerFile], cases: list[dict | None],
                      prompts: list[str] = PROMPTS, concurrently: bool = False) -> tuple[float, float]:
    """Each prompt under each case (vllm_xargs; None: unsteered), 8 greedy tokens with logprobs,
    one request at a time or all at once: (the largest |served logprob - the float64 formula|, the
    smallest steer effect: at each steered position the largest |steered - unsteered| formula
    logprob over the vocabulary, the smallest over positions)."""
    jobs = [(tokenizer(p)["input_ids"], xargs) for p in prompts for xargs in cases]
    if concurrently:
        async def all_at_once():
            aclient = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
            model_id = (await aclient.models.list()).data[0].id
            try:
                return await asyncio.gather(*(aclient.completions.create(
                    model=model_id, prompt=ids, max_tokens=8, temperature=0, logprobs=1,
                    extra_body={"return_tokens_as_token_ids": True, **({"vllm_xargs": x} if x else {})})
                    for ids, x in jobs))
            finally:
                await aclient.close()

        choices = [r.choices[0] for r in asyncio.run(all_at_once())]
    else:
        choices = [complete(server, ids, xargs, max_tokens=8, logprobs=1).choices[0] for ids, xargs in jobs]
    worst, smallest_effect = 0.0, math.inf
    for (ids, xargs), choice in zip(jobs, choices, strict=True):
        gen = token_ids(choice)
        ref = hf_steered_logprobs(model, ids + gen, steers, xargs or {})
        unsteered = hf_steered_logprobs(model, ids + gen, steers, {})
        for i, (tok, lp) in enumerate(zip(gen, choice.logprobs.token_logprobs, strict=True)):
            pos = len(ids) - 1 + i
            worst = max(worst, abs(lp - ref[pos, tok].item()))
            if xargs:
                smallest_effect = min(smallest_effect, abs(ref[pos] - unsteered[pos]).max().item())
    return worst, smallest_effect


def test_logprobs_match_hf_formula(servers, hf_model, steer_paths):
    """The plugin's logprobs equal the paper's formula computed with HF transformers.

    Tolerance 2e-3 nats: both sides run float32 but with different attention and matmul
    kernels (vLLM's CPU backend vs HF's SDPA), which moves logits by ~1e-4 over 30 layers;
    the steer's own effect on the same logprobs is asserted to be far larger."""
    model, tokenizer = hf_model
    steers = {name: SteerFile.load(path) for name, path in steer_paths.items()}
    worst, smallest_effect = served_vs_formula(servers["steer"], model, tokenizer, steers, STEER_CASES)
    assert worst < 2e-3, f"largest |logprob difference| vs the HF formula: {worst}"
    assert smallest_effect > 20 * 2e-3, f"steer too weak for the test to mean anything: {smallest_effect}"


# ---------------------------------------------------------------------------- isolation

SHARED_PREFIX = "Here is a short story about a lighthouse keeper who"
LONG_PROMPT = " ".join(
    f"On day {d} of the trip we walked to the {place}, ate {food} and talked about {topic}."
    for d, (place, food, topic) in enumerate(
        [("harbour", "fish", "boats"), ("old mill", "bread", "rivers"), ("market", "figs", "prices"),
         ("castle", "soup", "kings"), ("beach", "ice cream", "tides"), ("museum", "cake", "paintings"),
         ("forest", "apples", "birds"), ("station", "sandwiches", "trains")] * 2, start=1)
) + " Looking back, the part I remember most is"


def isolation_requests() -> list[tuple[str, dict | None, int]]:
    """(prompt, vllm_xargs, max_tokens): 20 requests, shared prefixes (prefix caching), one
    prompt long enough for several prefill chunks, lengths that finish at different steps."""
    values = [None, {"steer_alpha": 5}, {"steer_alpha": -5}, {"steer_beta": 4}, {"steer_alpha": 3, "steer_beta": -3},
              {"steer_alpha": [1.5, 0.5]}, None, {"steer_beta": -6}, {"steer_alpha": 8}, {"steer_alpha": -2.5},
              {"steer_alpha": 0}, {"steer_alpha": [0, 0]}, {"steer_beta": 1, "steer_alpha": 1}, None,
              {"steer_alpha": 6, "steer_beta": 6}, {"steer_alpha": -7}]
    reqs = []
    for i, xargs in enumerate(values):
        prompt = f"{SHARED_PREFIX} {['lost', 'found', 'kept', 'sold'][i % 4]} a key" if i % 3 else PROMPTS[i % 3]
        reqs.append((prompt, xargs, 6 + 5 * (i % 7)))
    # The same prompt under different values: one prompt's KV cache serves any steer.
    reqs += [(LONG_PROMPT, x, 10) for x in (None, {"steer_alpha": 5}, {"steer_alpha": -5}, {"steer_beta": 5})]
    return reqs


async def run_concurrently(server, requests):
    aclient = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
    model = (await aclient.models.list()).data[0].id

    async def one(prompt, xargs, max_tokens):
        r = await aclient.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body={"vllm_xargs": xargs} if xargs else {})
        return r.choices[0].text

    try:
        return await asyncio.gather(*(one(*r) for r in requests))
    finally:
        await aclient.close()


def run_alone(server, requests):
    return [complete(server, p, x, max_tokens=m).choices[0].text for p, x, m in requests]


def test_unsteered_batch_invariance_baseline(servers):
    """The premise of the isolation test: unsteered float32 vLLM here gives the same greedy
    text batched as alone. If this fails, the engine, not the plugin, is batch-variant."""
    reqs = [(p, None, m) for p, _, m in isolation_requests()]
    assert asyncio.run(run_concurrently(servers["steer"], reqs)) == run_alone(servers["steer"], reqs)


def test_concurrent_steered_requests_equal_solo_runs(servers):
    reqs = isolation_requests()
    batched = asyncio.run(run_concurrently(servers["steer"], reqs))
    alone = run_alone(servers["steer"], reqs)
    mismatches = [(r, b, a) for r, b, a in zip(reqs, batched, alone, strict=True) if b != a]
    assert not mismatches, mismatches
    # The steers really act: the same prompt under different values gives different text.
    long_texts = batched[-4:]
    assert len(set(long_texts)) == 4, long_texts


def test_all_zero_values_equal_unsteered(servers):
    """An all-zero vector is exactly the unsteered model; a scalar 0 is not, because it
    keeps the bias dim at its fixed value (as the reference does with [0, 1])."""
    plain = complete(servers["steer"], PROMPTS[0], None, max_tokens=16, logprobs=1).choices[0]
    zero = complete(servers["steer"], PROMPTS[0], {"steer_alpha": [0, 0], "steer_beta": [0]}, max_tokens=16,
                    logprobs=1).choices[0]
    assert zero.text == plain.text
    assert zero.logprobs.token_logprobs == plain.logprobs.token_logprobs
    bias_only = complete(servers["steer"], PROMPTS[0], {"steer_alpha": 0}, max_tokens=16, logprobs=1).choices[0]
    assert bias_only.logprobs.token_logprobs != plain.logprobs.token_logprobs


def test_unsteered_requests_equal_vllm_without_plugin(servers):
    for prompt in [*PROMPTS, LONG_PROMPT]:
        ours = complete(servers["steer"], prompt, None, max_tokens=16, logprobs=3).choices[0]
        theirs = complete(servers["plain"], prompt, None, max_tokens=16, logprobs=3).choices[0]
        assert ours.text == theirs.text
        assert ours.logprobs.token_logprobs == theirs.logprobs.token_logprobs
        assert ours.logprobs.top_logprobs == theirs.logprobs.top_logprobs


# ---------------------------------------------------------------------------- bad input

BAD_XARGS = [
    ({"steer_nope": 1}, "unknown steer 'nope'"),
    ({"steer_alpha": [1, 2, 3]}, "list of 3"),
    ({"steer_alpha": []}, "list of 0"),
    ({"steer_alpha": "3"}, "got the string"),
    ({"steer_alpha": [1, "x"]}, "steer_alpha[1] must be a number"),
    ({"steer_alpha": 1e6}, "beyond the allowed range"),
    ({"steer_beta": -51}, "beyond the allowed range"),
    ({"steer_alpha": [1, 100]}, "beyond the allowed range"),
]


@pytest.mark.parametrize("xargs,message", BAD_XARGS, ids=[json.dumps(x) for x, _ in BAD_XARGS])
def test_bad_steer_values_get_400(servers, xargs, message):
    with pytest.raises(openai.BadRequestError) as err:
        complete(servers["steer"], PROMPTS[0], xargs)
    assert message in str(err.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_get_400(servers, literal):
    """Python's JSON (and so vLLM's) accepts these literals; the steer check must catch them.
    Sent as raw JSON because the openai client refuses to encode them."""
    model = json.dumps(client(servers["steer"]).models.list().data[0].id)
    body = f'{{"model": {model}, "prompt": "Hi", "max_tokens": 2, "vllm_xargs": {{"steer_alpha": {literal}}}}}'
    r = httpx.post(servers["steer"].url + "/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert "finite" in r.text or "NaN" in r.text or "nan" in r.text.lower()


def test_nested_list_and_prompt_logprobs_rejected(servers):
    with pytest.raises(openai.BadRequestError):
        complete(servers["steer"], PROMPTS[0], {"steer_alpha": [[1, 2]]})
    c = client(servers["steer"])
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=c.models.list().data[0].id, prompt=PROMPTS[0], max_tokens=2,
                             extra_body={"vllm_xargs": {"steer_alpha": 2}, "prompt_logprobs": 1})
    assert "prompt_logprobs" in str(err.value)


def test_server_still_serves_after_bad_requests(servers):
    """Runs after the 400s above: the same steered request still gives its solo answer."""
    before = complete(servers["steer"], PROMPTS[1], {"steer_alpha": 4}).choices[0].text
    for xargs, _ in BAD_XARGS:
        with pytest.raises(openai.BadRequestError):
            complete(servers["steer"], PROMPTS[1], xargs)
    assert complete(servers["steer"], PROMPTS[1], {"steer_alpha": 4}).choices[0].text == before
    assert complete(servers["steer"], PROMPTS[1], None).choices[0].text != before


def test_chat_completions_are_steered(servers):
    c = client(servers["steer"])
    model = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "Describe your day in one sentence."}]
    plain = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    steered = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                        extra_body={"vllm_xargs": {"steer_alpha": 6}})
    assert steered.choices[0].message.content != plain.choices[0].message.content
