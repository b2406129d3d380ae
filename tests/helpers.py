"""What the test modules share: the engine arguments and environment of the suite's servers, random steers
at the suite's strength, the requests they send through the official `openai` client, the paper's formula
computed independently from HF transformers, and a stand-in for the vLLM config the processor reads.
Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from vllm_steer import SteerFile, testing
from vllm_steer.testing import CPU_SERVER_ARGS

# Prefix caching and chunked prefill on, with a token budget small enough that the long
# prompt in the isolation test is prefilled in several chunks. COMPILED_ENGINE_ARGS keep vLLM's default
# torch.compile of the model (the LoRA servers run it: vLLM's default mode, steered and plain); the
# others run eager, which starts in a fraction of the time. Compilation covers the backbone only: the
# steer acts in the logits layer, outside the compiled graph, in either mode.
COMPILED_ENGINE_ARGS = [*CPU_SERVER_ARGS, "--max-num-seqs", "32", "--enable-prefix-caching",
                        "--enable-chunked-prefill", "--max-num-batched-tokens", "128", "--seed", "0"]
ENGINE_ARGS = [*COMPILED_ENGINE_ARGS, "--enforce-eager"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The session's steer server also runs the runtime registry, bounds beta more tightly, serves two presets as
# models and the playground page, and loads the shipped steers beside the suite's random ones.
PRESETS = {"alpha-strong": {"alpha": 5}, "composed": {"alpha": [2.5, -1], "beta": 3}}
STEER_SERVER_ARGS = ["--allow-runtime-updates", "--steer-bound", "beta=20", "--steer-playground",
                     "--steer-preset", "alpha-strong=alpha:5", "--steer-preset", "composed=alpha:[2.5,-1],beta:3"]
SHIPPED_STEERS = {p.stem: str(p) for p in sorted((Path(__file__).resolve().parent.parent / "steers")
                                                  .glob("*.safetensors"))}


def load_dir_args(tmp_path_factory) -> list[str]:
    """The suite's runtime loads read steers from pytest's temporary folders: the servers that allow them
    get the folder above those as their steer load folder."""
    return ["--steer-load-dir", str(tmp_path_factory.getbasetemp())]
# vLLM's automatic CPU binding wants one NUMA node per process that computes (tensor or pipeline
# rank, data-parallel engine); this machine has one, so the two processes' OpenMP threads are bound
# by hand, one allowed core each.
ALLOWED_CPUS = sorted(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(ALLOWED_CPUS) < 2,
                               reason="two ranks or engines on CPU need two cores to bind them to")
TWO_PROCESS_ENV = {**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, ALLOWED_CPUS[:2]))}
# Large enough that +-5 changes greedy text, small enough that it stays text: at s=5 the
# steer moves h by roughly a fifth of its norm (eps * s * sigma^2 * sqrt(r * D) ~ 0.2).
STEER_SIGMA = 0.45


def random_steer(dim_names: list[str], rank: int, seed: int, fingerprint: dict | None, **kw) -> SteerFile:
    """A random steer for the default model (D = 576) at the suite's strength."""
    return testing.random_steer(dim_names, 576, rank, seed=seed, sigma=STEER_SIGMA, fingerprint=fingerprint,
                                      base_model="SmolLM2-135M-Instruct", **kw)


PROMPTS = [
    "The weather in the mountains this weekend",
    "I opened the letter from my landlord and",
    "Our team meeting this morning was",
]

SHARED_PREFIX = "Here is a short story about a lighthouse keeper who"
LONG_PROMPT = " ".join(
    f"On day {d} of the trip we walked to the {place}, ate {food} and talked about {topic}."
    for d, (place, food, topic) in enumerate(
        [("harbour", "fish", "boats"), ("old mill", "bread", "rivers"), ("market", "figs", "prices"),
         ("castle", "soup", "kings"), ("beach", "ice cream", "tides"), ("museum", "cake", "paintings"),
         ("forest", "apples", "birds"), ("station", "sandwiches", "trains")] * 2, start=1)
) + " Looking back, the part I remember most is"


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def complete(server, prompt, xargs=None, max_tokens=12, logprobs=None, **kw):
    extra = {"vllm_xargs": xargs} if xargs else {}
    if logprobs:
        extra["return_tokens_as_token_ids"] = True
    return client(server).completions.create(
        model=client(server).models.list().data[0].id, prompt=prompt, max_tokens=max_tokens, temperature=0,
        logprobs=logprobs, extra_body=extra, **kw)


def metric(server, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (matching `labels`) on the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def token_ids(choice) -> list[int]:
    return [int(t.split(":")[1]) for t in choice.logprobs.tokens]


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


def stand_in_config(v2: bool, max_num_seqs: int = 8):
    return SimpleNamespace(
        use_v2_model_runner=v2,
        parallel_config=SimpleNamespace(enable_batch_sharded_sampling=False),
        model_config=SimpleNamespace(get_hidden_size=lambda: 576, get_vocab_size=lambda: 49152),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        speculative_config=None,
        additional_config={},
    )


# ---------------------------------------------------------------------------- the playground in a browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def open_playground(browser, server, key: str | None = None) -> None:
    """Open the server's /playground and wait until it has listed the steers."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url.removesuffix("/v1") + "/playground" + (f"?key={key}" if key else ""))
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def text_of(browser, element_id: str) -> str:
    """The text of the page's element `element_id`, as the page wrote it."""
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


# ---------------------------------------------------------------------------- refusals by vllm-steer serve itself


def refused_by_cli(argv: list[str], capsys, monkeypatch) -> str:
    """`vllm-steer ARGV` run in this process, which must refuse with exit status 2 before vLLM starts (starting
    it fails the test): what it wrote to stderr."""
    from vllm_steer.cli import main
    from vllm_steer.launch import plan

    def no_launch(*_args, **_kwargs):
        raise AssertionError(f"vllm-steer {' '.join(argv)} was not refused: it went on to start vLLM")

    monkeypatch.setattr(plan, "launch", no_launch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err
