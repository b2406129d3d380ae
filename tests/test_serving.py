"""The plugin in the real vLLM engine (CPU build, float32) on the real default model, driven
through the OpenAI-compatible server with the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from helpers import (
    LONG_PROMPT,
    PROMPTS,
    SHARED_PREFIX,
    client,
    complete,
    run_alone,
    run_concurrently,
    served_vs_formula,
)

from vllm_steer import SteerFile

# Each a request's vllm_xargs: one steer, two composed, a full K-vector, negative values.
STEER_CASES = [
    {"steer_alpha": 5},
    {"steer_alpha": -5, "steer_beta": 3},
    {"steer_alpha": [2.5, -1.0]},
]


# ---------------------------------------------------------------------------- parity


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
