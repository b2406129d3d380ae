"""Each request keeps exactly its own steer under the engine's own dynamics: preemption and
resumption, aborts and client disconnects, n > 1 and seeded sampling, stop strings,
max_tokens=1, chunked prefill, prefix caching; and what the plugin cannot serve (speculative
decoding, tensor parallelism on this model) is refused with a clear error.

Real vLLM (CPU build, float32) on the default model, through the official `openai` client over
HTTP. Most tests reuse the session's steer and plain servers (conftest `servers`); this module
starts one more server of its own, with a KV cache small enough that the scheduler preempts,
and, alongside it, two `vllm-steer serve` commands that must refuse to start.

Prompt logprobs with steering are refused with a 400: see test_serving.py
(test_nested_list_and_prompt_logprobs_rejected); not repeated here.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import (
    LONG_PROMPT,
    PROMPTS,
    SERVER_ENV,
    TWO_PROCESS_ENV,
    client,
    complete,
    load_dir_args,
    metric,
    run_alone,
    run_concurrently,
    served_vs_formula,
    two_cores,
)

from vllm_steer import SteerFile, embedding_fingerprint
from vllm_steer.steer.fingerprint import fingerprint_mismatch
from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, steer_server_command

# A KV cache of 20 blocks of 32 tokens (640 tokens) for up to 16 sequences: 16 requests of
# ~10 prompt + 64 new tokens need ~48 blocks, so the scheduler must preempt and resume.
# (The CPU attention backend needs block sizes that are multiples of 32.)
# Eager: no torch.compile warm-up, which takes minutes on a busy machine (the steer acts
# outside the compiled backbone either way).
PREEMPT_ARGS = [*CPU_SERVER_ARGS, "--max-model-len", "512", "--block-size", "32", "--num-gpu-blocks-override", "20",
                "--max-num-seqs", "16", "--seed", "0", "--enforce-eager"]
SPEC_CONFIG = json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
SPEC_REFUSAL = "Custom logits processors are not supported when speculative decoding is enabled"
TP_REFUSAL = "Total number of attention heads (9) must be divisible by tensor parallel size (2)"


# ---------------------------------------------------------------------------- helpers


def wait_engine_idle(server: ServerProcess, timeout: float) -> float:
    """Seconds until no request is running or waiting in the engine; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(server, "vllm:num_requests_running") + metric(server, "vllm:num_requests_waiting") == 0:
            return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"requests still in the engine after {timeout} s")


def texts(response) -> list[str]:
    return [c.text for c in sorted(response.choices, key=lambda c: c.index)]


def model_id(server: ServerProcess) -> str:
    return client(server).models.list().data[0].id


# ---------------------------------------------------------------------------- this module's processes


@pytest.fixture(scope="module")
def engines(request, model_dir, steer_paths, tmp_path_factory):
    """The small-KV-cache steer server, and two servers that must refuse to start (speculative
    decoding; tensor-parallel size 2), all started at once and while the session's servers
    start, to share the start-up wait."""
    logs = tmp_path_factory.mktemp("dynamics_logs")
    model = str(model_dir)
    procs = {
        "preempt": ServerProcess(steer_server_command(model, steer_paths, *PREEMPT_ARGS), logs / "preempt.log",
                                 env=SERVER_ENV),
        "spec": ServerProcess(steer_server_command(model, steer_paths, *CPU_SERVER_ARGS, "--speculative-config",
                                                   SPEC_CONFIG), logs / "spec.log", env=SERVER_ENV),
        "tp2": ServerProcess(steer_server_command(model, steer_paths, *TP2_ARGS), logs / "tp2.log",
                             env=TWO_PROCESS_ENV),
    }
    for proc in procs.values():
        proc.start()
    try:
        request.getfixturevalue("servers")
        procs["preempt"].wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


# ---------------------------------------------------------------------------- preemption

PREEMPT_VALUES: list[dict | None] = [
    None, {"steer_alpha": 5}, {"steer_alpha": -5}, {"steer_beta": 4}, {"steer_alpha": 3, "steer_beta": -3},
    {"steer_alpha": [1.5, 0.5]}, None, {"steer_beta": -6}, {"steer_alpha": 8}, {"steer_alpha": -2.5},
    {"steer_alpha": [0, 0]}, {"steer_alpha": 6, "steer_beta": 6}, {"steer_alpha": -7}, {"steer_beta": [2]},
    {"steer_alpha": 0}, None,
]


def test_preempted_and_resumed_requests_keep_their_steer(engines):
    """16 concurrent greedy 64-token requests (unsteered, single, composed, full vectors) on a
    KV cache too small for them: the scheduler preempts and resumes (counted by vLLM itself),
    and every request still equals its solo run."""
    server = engines["preempt"]
    reqs = [(PROMPTS[i % 3], xargs, 64) for i, xargs in enumerate(PREEMPT_VALUES)]
    before = metric(server, "vllm:num_preemptions_total")
    batched = asyncio.run(run_concurrently(server, reqs))
    preemptions = metric(server, "vllm:num_preemptions_total") - before
    assert preemptions > 0, "no preemption happened: the test proves nothing"
    alone = run_alone(server, reqs)
    mismatches = [(r[1], b, a) for r, b, a in zip(reqs, batched, alone, strict=True) if b != a]
    assert not mismatches, f"{len(mismatches)}/16 differ after {preemptions:.0f} preemptions: {mismatches}"
    # The steers really act: per prompt, the distinct settings give distinct texts.
    assert len(set(batched)) >= 12, batched


# ---------------------------------------------------------------------------- aborts and disconnects

WITNESSES: list[tuple[str, dict | None, int]] = [
    (PROMPTS[0], None, 24), (PROMPTS[1], {"steer_alpha": 5}, 32), (PROMPTS[2], {"steer_beta": -5}, 20),
    (PROMPTS[0], {"steer_alpha": -4, "steer_beta": 4}, 28), (PROMPTS[1], None, 16),
    (PROMPTS[2], {"steer_alpha": [2, -1]}, 30), (PROMPTS[0], {"steer_alpha": 7}, 18),
    (PROMPTS[1], {"steer_beta": 6}, 26),
]
VICTIM_PROMPT = "Write a very long story about a dragon who"
VICTIM_TOKENS = 900  # far more than could finish during the test: they must be aborted
VICTIM_BODY = {"ignore_eos": True}  # no early end of text: the victims run until aborted


async def witnesses_with_aborts(server: ServerProcess) -> tuple[list[str], dict[str, int]]:
    """The witnesses, run concurrently with 8 steered requests that are abandoned mid-way:
    4 streams closed after a few chunks, 2 non-streaming calls whose task is cancelled, 2
    whose HTTP client times out."""
    aclient = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
    model = (await aclient.models.list()).data[0].id
    outcome = {"streams_closed": 0, "cancelled": 0, "timed_out": 0}

    async def stream_and_close(xargs: dict) -> None:
        stream = await aclient.completions.create(model=model, prompt=VICTIM_PROMPT, max_tokens=VICTIM_TOKENS,
                                                  temperature=0, stream=True,
                                                  extra_body={**VICTIM_BODY, "vllm_xargs": xargs})
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 3:
                break
        await stream.close()
        outcome["streams_closed"] += 1

    async def cancel_after(xargs: dict, seconds: float) -> None:
        task = asyncio.create_task(aclient.completions.create(
            model=model, prompt=VICTIM_PROMPT, max_tokens=VICTIM_TOKENS, temperature=0,
            extra_body={**VICTIM_BODY, "vllm_xargs": xargs}))
        await asyncio.sleep(seconds)
        assert not task.done(), "the victim finished before it could be cancelled"
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcome["cancelled"] += 1

    async def time_out(xargs: dict, seconds: float) -> None:
        body = {"model": model, "prompt": VICTIM_PROMPT, "max_tokens": VICTIM_TOKENS, "temperature": 0,
                "vllm_xargs": xargs, **VICTIM_BODY}
        async with httpx.AsyncClient(timeout=seconds) as http:
            try:
                await http.post(server.url + "/completions", json=body)
            except httpx.TimeoutException:
                outcome["timed_out"] += 1

    async def witness(prompt: str, xargs: dict | None, max_tokens: int) -> str:
        r = await aclient.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body={"vllm_xargs": xargs} if xargs else {})
        return r.choices[0].text

    victims = [stream_and_close({"steer_alpha": 9}), stream_and_close({"steer_beta": -9}),
               stream_and_close({"steer_alpha": -9, "steer_beta": 9}), stream_and_close({"steer_alpha": [9, 3]}),
               cancel_after({"steer_alpha": 8}, 1.5), cancel_after({"steer_beta": 8}, 2.5),
               time_out({"steer_alpha": -8}, 1.5), time_out({"steer_alpha": 4, "steer_beta": -8}, 2.0)]
    try:
        results = await asyncio.gather(*(witness(*w) for w in WITNESSES), *victims)
    finally:
        await aclient.close()
    return list(results[: len(WITNESSES)]), outcome


def test_aborts_and_disconnects_leak_nothing(servers):
    server = servers["steer"]
    alone = run_alone(server, WITNESSES)
    batched, outcome = asyncio.run(witnesses_with_aborts(server))
    assert outcome == {"streams_closed": 4, "cancelled": 2, "timed_out": 2}
    assert batched == alone
    # The abandoned requests left the engine: 8 x 900 tokens could not have finished by now.
    wait_engine_idle(server, timeout=30)
    # Rows the aborted requests held are reused by later requests: still each its own steer.
    again = asyncio.run(run_concurrently(server, WITNESSES))
    assert again == alone


# ---------------------------------------------------------------------------- n > 1, best_of, beam search

N_PROMPT = "My favourite food is"


def test_n_greedy_samples_all_equal_the_steered_greedy_output(servers):
    """vLLM 0.32 refuses n > 1 with temperature 0 itself ("n must be 1 when using greedy
    sampling"), a clean 400; top_k=1 sampling is greedy and allows n > 1: all n samples equal
    the single greedy steered output."""
    server, xargs = servers["steer"], {"steer_alpha": 5}
    c = client(server)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=model_id(server), prompt=N_PROMPT, max_tokens=12, temperature=0, n=3,
                             extra_body={"vllm_xargs": xargs})
    assert "n must be 1 when using greedy sampling" in str(err.value)
    greedy = complete(server, N_PROMPT, xargs).choices[0].text
    assert greedy != complete(server, N_PROMPT, None).choices[0].text
    samples = c.completions.create(model=model_id(server), prompt=N_PROMPT, max_tokens=12, temperature=1.0, n=3,
                                   extra_body={"top_k": 1, "vllm_xargs": xargs})
    assert texts(samples) == [greedy] * 3


def test_seeded_samples_are_steered(servers):
    """With the same seed, n=4 steered samples are reproducible and differ from the unsteered
    samples: the sampler's randomness is the same, the distribution is steered."""
    server = servers["steer"]
    c = client(server)

    def sample(xargs: dict | None) -> list[str]:
        return texts(c.completions.create(model=model_id(server), prompt=N_PROMPT, max_tokens=12, temperature=1.0,
                                          n=4, seed=1234, extra_body={"vllm_xargs": xargs} if xargs else {}))

    steered, unsteered = sample({"steer_alpha": 5}), sample(None)
    assert sample({"steer_alpha": 5}) == steered
    assert sample(None) == unsteered
    assert sum(s != u for s, u in zip(steered, unsteered, strict=True)) >= 3, (steered, unsteered)


def test_best_of_is_dropped_by_vllm(servers):
    """vLLM 0.32's completions API has no `best_of` field any more: it is logged and dropped
    (not a 400), so a steered request with best_of=3 is the plain steered request."""
    server, xargs = servers["steer"], {"steer_alpha": 5}
    c = client(server)
    kw = {"model": model_id(server), "prompt": N_PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    with_best_of = c.completions.create(**kw, extra_body={"best_of": 3, "vllm_xargs": xargs})
    without = c.completions.create(**kw, extra_body={"vllm_xargs": xargs})
    assert len(with_best_of.choices) == 1
    assert texts(with_best_of) == texts(without)
    greedy = complete(server, N_PROMPT, xargs).choices[0].text
    assert texts(c.completions.create(**{**kw, "temperature": 0}, extra_body={"best_of": 3, "vllm_xargs": xargs})) \
        == [greedy]


def test_steered_beam_search_is_refused(servers):
    """vLLM's beam search builds its own per-step SamplingParams without vllm_xargs, so the
    plugin refuses a steered beam search (completions and chat) with a 400 rather than answer
    it unsteered; unsteered beam search and other vllm_xargs keys are untouched."""
    server = servers["steer"]
    model = model_id(server)
    cases = {"/completions": {"prompt": N_PROMPT}, "/chat/completions": {"messages": [{"role": "user",
                                                                                        "content": N_PROMPT}]}}
    for path, body in cases.items():
        body = {**body, "model": model, "max_tokens": 8, "temperature": 0, "n": 2, "use_beam_search": True}
        url = server.url + path
        unsteered = httpx.post(url, json=body, timeout=120)
        assert unsteered.status_code == 200, unsteered.text
        assert len(unsteered.json()["choices"]) == 2
        other_key = httpx.post(url, json={**body, "vllm_xargs": {"other": 1}}, timeout=120)
        assert other_key.status_code == 200 and other_key.json()["choices"] == unsteered.json()["choices"]
        for xargs in ({"steer_alpha": 6}, {"steer_nope": 1}, {"steer_alpha": 0}):
            refused = httpx.post(url, json={**body, "vllm_xargs": xargs}, timeout=120)
            assert refused.status_code == 400, (path, xargs, refused.text)
            assert "use_beam_search" in refused.json()["error"]["message"]
    assert complete(server, N_PROMPT, {"steer_alpha": 6}).choices[0].text  # still serving


# ---------------------------------------------------------------------------- stop strings, max_tokens=1

def test_stop_strings_and_max_tokens_1_in_a_mixed_batch(servers):
    """Requests that stop on a string, and max_tokens=1 requests (they leave the batch the step
    after they enter it), batched with ordinary ones: each equals its solo run; the stop
    string cuts the steered greedy text where it first occurs."""
    server = servers["steer"]
    xargs_list = [{"steer_alpha": 5}, {"steer_alpha": -5, "steer_beta": 3}, {"steer_beta": 6}, None]
    full = {json.dumps(x): complete(server, PROMPTS[1], x, max_tokens=24).choices[0].text for x in xargs_list}
    assert len(set(full.values())) == 4

    async def batch() -> list[tuple[str, str]]:
        aclient = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0)
        model = (await aclient.models.list()).data[0].id

        async def one(xargs: dict | None, max_tokens: int, stop: list[str] | None) -> tuple[str, str]:
            r = await aclient.completions.create(model=model, prompt=PROMPTS[1], max_tokens=max_tokens, temperature=0,
                                                 stop=stop, extra_body={"vllm_xargs": xargs} if xargs else {})
            return r.choices[0].text, r.choices[0].finish_reason

        try:
            jobs = []
            for x in xargs_list:
                text = full[json.dumps(x)]
                stop_word = text.split()[3]  # a word in the middle of this request's own text
                jobs += [one(x, 24, [stop_word]), one(x, 1, None), one(x, 24, None)]
            return await asyncio.gather(*jobs)
        finally:
            await aclient.close()

    results = asyncio.run(batch())
    for i, x in enumerate(xargs_list):
        text = full[json.dumps(x)]
        stop_word = text.split()[3]
        (stopped, reason), (first, first_reason), (whole, _) = results[3 * i: 3 * i + 3]
        assert (stopped, reason) == (text[: text.index(stop_word)], "stop"), (x, stop_word, stopped)
        assert first_reason == "length" and first and text.startswith(first), (x, first)
        assert first == complete(server, PROMPTS[1], x, max_tokens=1).choices[0].text
        assert whole == text


# ---------------------------------------------------------------------------- prefix caching, chunked prefill

CACHED_PROMPT = " ".join(
    f"Note {i}: the {thing} in room {i} was {state}, so the caretaker wrote it down and moved on."
    for i, (thing, state) in enumerate([("lamp", "flickering"), ("clock", "slow"), ("window", "open"),
                                        ("radiator", "cold"), ("door", "squeaking"), ("tap", "dripping")] * 3, 1)
) + " At the end of the night the caretaker decided that"


def test_one_cached_prompt_under_different_steers(servers):
    """A ~330-token prompt (prefilled in chunks of 128 tokens) under four settings: the first
    request fills the prefix cache, the others hit it (vLLM's own counter), and each result
    differs from the others, equals its solo run, and the unsteered one equals vLLM without
    the plugin. Run alone, then all together with a short prompt decoding alongside."""
    server = servers["steer"]
    settings = [None, {"steer_alpha": 8}, {"steer_alpha": -8}, {"steer_alpha": -4, "steer_beta": 8}]
    reqs = [(CACHED_PROMPT, x, 24) for x in settings]
    hits = metric(server, "vllm:prefix_cache_hits_total")
    alone = run_alone(server, reqs)
    assert metric(server, "vllm:prefix_cache_hits_total") - hits >= 3 * 256, "the prompt's blocks were not reused"
    assert len(set(alone)) == 4, alone
    batched = asyncio.run(run_concurrently(server, [*reqs, (LONG_PROMPT, {"steer_beta": -4}, 24),
                                                    (PROMPTS[2], {"steer_alpha": 2}, 30)]))
    assert batched[:4] == alone
    plain = complete(servers["plain"], CACHED_PROMPT, None, max_tokens=24, logprobs=1).choices[0]
    ours = complete(server, CACHED_PROMPT, None, max_tokens=24, logprobs=1).choices[0]
    assert ours.text == plain.text == alone[0]
    assert ours.logprobs.token_logprobs == plain.logprobs.token_logprobs


# ---------------------------------------------------------------------------- refused configurations


def test_speculative_decoding_is_refused_at_startup(engines):
    """vLLM's legacy model runner (the CPU backend's) rejects custom logits processors when a
    speculative config is set, at engine start-up, before serving anything: `vllm-steer
    serve --speculative-config ...` exits non-zero with that message. (On GPU, Model Runner V2
    keeps custom processors active under speculative decoding; not testable here.)"""
    proc = engines["spec"]
    assert proc.wait_exit(timeout=400) != 0
    log = proc.log_tail(200_000)
    assert SPEC_REFUSAL in log, log[-4000:]


def test_tensor_parallel_2_cannot_run_the_default_model(engines):
    """The default model (SmolLM2-135M) has 9 attention heads, which vLLM cannot split over 2
    ranks: the configuration is refused before any worker starts. TP=2 on CPU itself works here,
    on a model that splits: the tests at the end of this file."""
    proc = engines["tp2"]
    assert proc.wait_exit(timeout=400) != 0
    log = proc.log_tail(200_000)
    assert TP_REFUSAL in log, log[-4000:]


def test_fingerprint_check_on_vocab_shards(output_embedding):
    """Under tensor parallelism each rank holds a slice of the LM head's rows and checks the
    fingerprint rows that fall in its slice (first_row = the slice's first vocab row): every
    rank of a 2- or 4-way split accepts the right embedding; the rank that holds a corrupted
    row refuses it, naming the row; the others, which do not hold it, cannot tell."""
    fp = embedding_fingerprint(output_embedding)
    vocab = output_embedding.shape[0]
    for ranks in (2, 4):
        shard = vocab // ranks
        for rank in range(ranks):
            first = rank * shard
            rows = output_embedding[first: first + shard]
            assert fingerprint_mismatch(fp, rows, first_row=first, vocab_size=vocab) is None
            # The same slice checked as if it started at row 0 is caught (wrong offset).
            if rank > 0:
                assert fingerprint_mismatch(fp, rows, first_row=0, vocab_size=vocab) is not None
    bad_row = fp["rows"][-1]
    corrupted = output_embedding.clone()
    corrupted[bad_row] *= 1.5
    holders = []
    for rank in range(2):
        first = rank * (vocab // 2)
        problem = fingerprint_mismatch(fp, corrupted[first: first + vocab // 2], first_row=first, vocab_size=vocab)
        if problem:
            holders.append(rank)
            assert f"row {bad_row}" in problem
    assert holders == [bad_row // (vocab // 2)]
    # A padded shard (vLLM pads the vocabulary to a multiple of 64 per rank) is checked on
    # its real rows only: the check is given weight[:num_org_elements].
    padded = torch.cat([output_embedding[vocab // 2:], torch.zeros(64, output_embedding.shape[1])])
    assert fingerprint_mismatch(fp, padded[: vocab // 2], first_row=vocab // 2, vocab_size=vocab) is None


# ---------------------------------------------------------------------------- TP=2 on a model that splits

TP2_ARGS = [*CPU_SERVER_ARGS, "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp", "--enforce-eager"]


def steer_off_in_rank_1_rows(tiny_model, path: Path) -> int:
    """Save the tiny model's steer with a fingerprint that is wrong only in a row of the second
    half of the vocabulary (held by TP rank 1 alone); returns that row."""
    _, model, steer, _ = tiny_model
    embedding = model.get_output_embeddings().weight.detach().clone()
    row = embedding_fingerprint(embedding)["rows"][-1]
    assert row >= embedding.shape[0] // 2
    embedding[row] *= 1.5
    SteerFile.create(steer.projector1, steer.projector2, dim_names=["gamma", "bias"], bias_dims={"bias": 1.0},
                     epsilon=1e-2, base_model="tiny", fingerprint=embedding_fingerprint(embedding)).save(path)
    return row


@pytest.fixture(scope="module")
def tp2_tiny(tiny_model, tmp_path_factory):
    """Two TP=2 servers of the tiny Llama, started at once to share the start-up wait: "steer" serves its
    steer (with the runtime registry); "off" is given a steer whose fingerprint only rank 1 can tell is
    wrong, and must exit. Also the steer file of the second, and the row that is wrong in it."""
    logs = tmp_path_factory.mktemp("tp2_logs")
    folder, _, _, steer_path = tiny_model
    row = steer_off_in_rank_1_rows(tiny_model, logs / "off.safetensors")
    procs = {
        "steer": ServerProcess(steer_server_command(str(folder), {"gamma": str(steer_path)}, *TP2_ARGS,
                                                    "--allow-runtime-updates", *load_dir_args(tmp_path_factory)),
                               logs / "tp2.log", env=TWO_PROCESS_ENV),
        "off": ServerProcess(steer_server_command(str(folder), {"off": str(logs / "off.safetensors")}, *TP2_ARGS),
                             logs / "tp2_off.log", env=TWO_PROCESS_ENV),
    }
    for proc in procs.values():
        proc.start()
    try:
        yield {**procs, "off_path": logs / "off.safetensors", "off_row": row}
    finally:
        for proc in procs.values():
            proc.stop()


@two_cores
def test_tensor_parallel_2_matches_the_formula(tiny_model, tp2_tiny):
    """vLLM's CPU backend runs tensor-parallel size 2 here once its OpenMP threads are bound
    by hand. On a model that splits over 2 ranks, the steered logprobs served with TP=2 equal
    the paper's formula computed in float64 by HF transformers (TP=1 equals it in the parity
    test), unsteered included: each rank steers the replicated hidden state itself. A runtime
    load of a steer that only rank 1 can tell is wrong is refused by all ranks (400), and the
    server then answers exactly as before."""
    from transformers import AutoTokenizer

    folder, model, steer, _ = tiny_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    server = tp2_tiny["steer"].wait_ready()
    assert "tensor_parallel_size=2" in server.log_tail(200_000)
    worst, smallest_effect = served_vs_formula(server, model, tokenizer, {"gamma": steer},
                                               [{"steer_gamma": 5}, {"steer_gamma": [-3, 1]}, None])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    before = complete(server, ids, {"steer_gamma": 5}, max_tokens=8, logprobs=1).choices[0]
    row = tp2_tiny["off_row"]
    off = {"name": "off", "path": str(tp2_tiny["off_path"])}
    refused = httpx.post(server.url + "/load_steer", json=off, timeout=120)
    assert refused.status_code == 400, refused.text
    assert "does not fit" in refused.text and f"row {row} norm" in server.log_tail(200_000)
    assert [s["name"] for s in httpx.get(server.url + "/steers", timeout=30).json()["data"]] == ["gamma"]
    after = complete(server, ids, {"steer_gamma": 5}, max_tokens=8, logprobs=1).choices[0]
    assert (after.text, after.logprobs.token_logprobs) == (before.text, before.logprobs.token_logprobs)
    assert worst < 1e-3, f"TP=2 vs the float64 formula: largest |logprob difference| {worst}"
    assert smallest_effect > 0.1, smallest_effect


@two_cores
def test_tensor_parallel_2_rank_1_checks_its_own_vocab_shard(tp2_tiny):
    """A fingerprint that is wrong only in a row of the second half of the vocabulary (held
    by rank 1 alone) stops a TP=2 start-up with the fingerprint error: rank 1 checks its
    shard at the right offset, and the server exits rather than hangs."""
    proc, row = tp2_tiny["off"], tp2_tiny["off_row"]
    refused_at = None
    deadline = time.monotonic() + 400
    while proc.proc.poll() is None and time.monotonic() < deadline:
        if refused_at is None and "does not fit this model's output embedding" in proc.log_tail(200_000):
            refused_at = time.monotonic()
        if refused_at is not None and time.monotonic() - refused_at > 90:
            break
        time.sleep(1)
    exited = proc.wait_exit(timeout=1) if proc.proc.poll() is not None else None
    log = proc.log_tail(200_000)
    assert f"row {row} norm" in log, log[-4000:]  # rank 1 found it, at the right offset
    assert exited is not None and exited != 0, "rank 1 refused the steer, but the server hung instead of exiting"
