"""The main job: start the default model under `vllm-steer serve` with the shipped steers and
print the same prompts at several steer values side by side. All requests go out at once,
so one batch carries every value."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import textwrap
from pathlib import Path

import openai

from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, random_steer, steer_server_command
from vllm_steer.tools.default_model import default_model_dir, default_output_embedding

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The movie I watched last night was", "My neighbour just told me that", "The food at this restaurant"]
VALUES = [-5, 5]


def shipped_or_made_steers(model_dir: Path, scratch: Path) -> dict[str, str]:
    shipped = {p.stem: str(p) for p in sorted((ROOT / "steers").glob("*.safetensors"))}
    if shipped:
        return shipped
    print("No trained steers are shipped yet: using a RANDOM steer made for this demo; its direction means "
          "nothing, it only shows that each request is steered with its own value.\n")
    emb = default_output_embedding(model_dir)
    path = scratch / "random.safetensors"
    random_steer(["random", "bias"], emb.shape[1], 64, sigma=0.45, embedding=emb, bias_dims={"bias": 1.0},
                 base_model="SmolLM2-135M-Instruct").save(path)
    return {"random": str(path)}


async def generate_all(url: str, jobs: list[tuple[str, dict]]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url, api_key="none")
    model = (await client.models.list()).data[0].id

    async def one(prompt: str, xargs: dict) -> str:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                            extra_body={"vllm_xargs": xargs} if xargs else {})
        return r.choices[0].text.strip().replace("\n", " ")

    try:
        return await asyncio.gather(*(one(p, x) for p, x in jobs))
    finally:
        await client.close()


def main() -> None:
    model_dir = default_model_dir()
    with tempfile.TemporaryDirectory() as scratch:
        steers = shipped_or_made_steers(model_dir, Path(scratch))
        columns: list[tuple[str, dict]] = [("unsteered", {})]
        columns += [(f"{name} {v:+g}", {f"steer_{name}": v}) for name in steers for v in VALUES]
        if len(steers) > 1:
            both = {f"steer_{name}": VALUES[-1] for name in steers}
            columns.append((" & ".join(f"{n} {VALUES[-1]:+g}" for n in steers), both))
        log = Path(scratch) / "server.log"
        print(f"starting vllm-steer serve {model_dir.name} with {', '.join(steers)} (about a minute on CPU)...",
              flush=True)
        with ServerProcess(steer_server_command(str(model_dir), steers, *CPU_SERVER_ARGS), log,
                           env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
            jobs = [(p, x) for p in PROMPTS for _, x in columns]
            texts = iter(asyncio.run(generate_all(server.url, jobs)))
    for prompt in PROMPTS:
        print(f"\n=== {prompt!r}")
        for label, _ in columns:
            print(textwrap.fill(next(texts), width=110, initial_indent=f"  {label:>24} | ",
                                subsequent_indent=" " * 29))
    print("\n(greedy decoding, 24 new tokens; each request above carried its own vllm_xargs steer values)")


if __name__ == "__main__":
    sys.exit(main())
