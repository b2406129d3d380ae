"""The main job: start the default model under `vllm-steer serve` with the shipped steers and print the same
prompts at several steer values side by side. All requests go out at once, so one batch carries every value.

Decoding: greedy (the same text on every run), with vLLM's repetition penalty 1.2 on every column, steered or
not: plain greedy decoding of this 135M model falls into loops that a steer can make worse (at detox +5 one
continuation repeats "slow" 23 times). Each continuation is checked: none may repeat a word more than three
times in a row (`repeated_word_run`); tests/test_demo.py runs this check on the same columns."""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import textwrap
from pathlib import Path

import openai

from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, steer_server_command
from vllm_steer.tools.default_model import default_model_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The movie I watched last night was", "My neighbour just told me that", "The food at this restaurant"]
VALUES = [-5, 5]
MAX_TOKENS = 24
DECODING = {"temperature": 0, "extra_body": {"repetition_penalty": 1.2}}
LONGEST_RUN = 3  # the most times one word may come in a row


def shipped_steers() -> dict[str, str]:
    """The trained steers in steers/: name -> path."""
    return {p.stem: str(p) for p in sorted((ROOT / "steers").glob("*.safetensors"))}


def columns(steers: list[str]) -> list[tuple[str, dict]]:
    """(label, vllm_xargs) of each column: unsteered, each steer at each value, all steers at the last value."""
    cols: list[tuple[str, dict]] = [("unsteered", {})]
    cols += [(f"{name} {v:+g}", {f"steer_{name}": v}) for name in steers for v in VALUES]
    if len(steers) > 1:
        cols.append((" & ".join(f"{n} {VALUES[-1]:+g}" for n in steers), {f"steer_{n}": VALUES[-1] for n in steers}))
    return cols


async def generate_all(url: str, jobs: list[tuple[str, dict]], api_key: str = "none") -> list[str]:
    """Each (prompt, vllm_xargs) completed with the demo's decoding, all at once."""
    client = openai.AsyncOpenAI(base_url=url, api_key=api_key)
    model = next(m.id for m in (await client.models.list()).data if m.parent is None)  # not a preset

    async def one(prompt: str, xargs: dict) -> str:
        extra = {**DECODING["extra_body"], **({"vllm_xargs": xargs} if xargs else {})}
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=DECODING["temperature"], extra_body=extra)
        return r.choices[0].text.strip().replace("\n", " ")

    try:
        return await asyncio.gather(*(one(p, x) for p, x in jobs))
    finally:
        await client.close()


def repeated_word_run(text: str) -> int:
    """The most times one word comes in a row in `text` (case and punctuation aside)."""
    words = re.findall(r"\w+", text.lower())
    best = run = 1 if words else 0
    for a, b in zip(words, words[1:], strict=False):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def main() -> int:
    model_dir = default_model_dir()
    steers = shipped_steers()
    cols = columns(list(steers))
    with tempfile.TemporaryDirectory() as scratch:
        print(f"starting vllm-steer serve {model_dir.name} with {', '.join(steers)} (about a minute on CPU)...",
              flush=True)
        with ServerProcess(steer_server_command(str(model_dir), steers, *CPU_SERVER_ARGS), Path(scratch) / "log",
                           env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
            jobs = [(p, x) for p in PROMPTS for _, x in cols]
            texts = asyncio.run(generate_all(server.url, jobs))
    rows = iter(texts)
    for prompt in PROMPTS:
        print(f"\n=== {prompt!r}")
        for label, _ in cols:
            print(textwrap.fill(next(rows), width=110, initial_indent=f"  {label:>24} | ",
                                subsequent_indent=" " * 29))
    print(f"\n(greedy decoding with repetition penalty 1.2, {MAX_TOKENS} new tokens; each request above carried "
          "its own vllm_xargs steer values)")
    loops = [t for t in texts if repeated_word_run(t) > LONGEST_RUN]
    if loops:
        print(f"\n{len(loops)} continuation(s) repeat a word more than {LONGEST_RUN} times in a row", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
