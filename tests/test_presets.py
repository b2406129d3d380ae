"""Steer presets served as models: a client that can only choose a model steers by choosing a preset, through
the official `openai` client with no `extra_body` at all; completions and chat, streamed or not, greedy or
sampled with a seed, each equal to the same request with the preset's values in vllm_xargs; the request's own
`steer_` keys override the preset's; presets listed as models with the base model as parent, counted in the
metrics, added and removed at run time with the same checks; a preset whose steer was unloaded is refused,
never served unsteered; and start-up refuses a preset that could not be served, naming it.

The session's steer server serves the presets of helpers.PRESETS."""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers import PRESETS, PROMPTS, client, metric, random_steer

from vllm_steer import embedding_fingerprint
from vllm_steer.cli import main as cli_main


def base_model(server) -> str:
    return next(m.id for m in client(server).models.list().data if m.parent is None)


def test_presets_are_listed_as_models_of_the_base_model(servers):
    models = {m.id: m for m in client(servers["steer"]).models.list().data}
    base = base_model(servers["steer"])
    assert {name: models[name].parent for name in PRESETS} == {name: base for name in PRESETS}
    listed = httpx.get(servers["steer"].url + "/steer_presets", timeout=30).json()["data"]
    assert {p["name"]: p["steers"] for p in listed} == PRESETS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_preset_is_its_values_in_vllm_xargs(servers, preset):
    """No extra_body: the model field alone steers. Completions (streamed and not, greedy and seeded) and chat
    equal the base model asked with the preset's values; the answer names the preset as its model."""
    c, base = client(servers["steer"]), base_model(servers["steer"])
    xargs = {f"steer_{steer}": value for steer, value in PRESETS[preset].items()}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        via_preset = c.completions.create(model=preset, prompt=PROMPTS[0], max_tokens=12, **kw)
        explicit = c.completions.create(model=base, prompt=PROMPTS[0], max_tokens=12, extra_body={"vllm_xargs": xargs},
                                        **kw)
        assert via_preset.model == preset and via_preset.choices[0].text == explicit.choices[0].text
    unsteered = c.completions.create(model=base, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    assert explicit.choices[0].text != unsteered or kw["temperature"] > 0
    chunks = list(c.completions.create(model=preset, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert {ch.model for ch in chunks} == {preset}
    assert streamed == c.completions.create(model=base, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            extra_body={"vllm_xargs": xargs}).choices[0].text
    messages = [{"role": "user", "content": "Describe your morning in one sentence."}]
    chat = c.chat.completions.create(model=preset, messages=messages, max_tokens=12, temperature=0)
    chat_explicit = c.chat.completions.create(model=base, messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"vllm_xargs": xargs})
    assert chat.model == preset and chat.choices[0].message.content == chat_explicit.choices[0].message.content
    chat_chunks = list(c.chat.completions.create(model=preset, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_chunks if ch.choices) == \
        chat_explicit.choices[0].message.content


def test_the_requests_own_steer_keys_override_the_presets(servers):
    c, base = client(servers["steer"]), base_model(servers["steer"])
    overridden = c.completions.create(model="composed", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                      extra_body={"vllm_xargs": {"steer_beta": -4, "other_key": 1}})
    explicit = c.completions.create(model=base, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                    extra_body={"vllm_xargs": {"steer_alpha": [2.5, -1], "steer_beta": -4}})
    assert overridden.choices[0].text == explicit.choices[0].text
    with pytest.raises(openai.BadRequestError, match="beyond the allowed range"):  # still checked
        c.completions.create(model="alpha-strong", prompt=PROMPTS[2], max_tokens=2,
                             extra_body={"vllm_xargs": {"steer_alpha": 5000}})


def test_presets_are_counted(servers):
    s = servers["steer"]
    before = metric(s, "vllm_steer_preset_requests_total", preset="alpha-strong")
    client(s).completions.create(model="alpha-strong", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert metric(s, "vllm_steer_preset_requests_total", preset="alpha-strong") == before + 1


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=300)


def test_presets_added_and_removed_at_run_time_and_refused_once_their_steer_is_gone(servers, output_embedding,
                                                                                   tmp_path):
    s = servers["steer"]
    c, base = client(s), base_model(s)
    path = tmp_path / "zeta.safetensors"
    random_steer(["zeta"], 16, 9, embedding_fingerprint(output_embedding)).save(path)
    assert post(s, "/load_steer", {"name": "zeta", "path": str(path)}).status_code == 200
    try:
        for body, message in [({"name": "calm", "steers": {"nope": 1}}, "unknown steer 'nope'"),
                              ({"name": "calm", "steers": {"zeta": 500}}, "beyond the allowed range"),
                              ({"name": "calm", "steers": {"zeta": [1, 2]}}, "expects a number or a list of 1"),
                              ({"name": base, "steers": {"zeta": 1}}, "has the name of the served model"),
                              ({"name": "bad name", "steers": {"zeta": 1}}, "must be letters, digits"),
                              ({"name": "alpha-strong", "steers": {"zeta": 1}}, "exists")]:
            r = post(s, "/load_preset", body)
            assert r.status_code == 400 and message in r.text, (body, r.text)
        assert post(s, "/load_preset", {"name": "calm", "steers": {"zeta": 4}}).status_code == 200
        assert "calm" in {m.id for m in c.models.list().data}
        via = c.completions.create(model="calm", prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0].text
        assert via == c.completions.create(model=base, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                           extra_body={"vllm_xargs": {"steer_zeta": 4}}).choices[0].text
    finally:
        assert post(s, "/unload_steer", {"name": "zeta"}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="preset 'calm': unknown steer 'zeta'"):
        c.completions.create(model="calm", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert post(s, "/unload_preset", {"name": "calm"}).status_code == 200
    assert post(s, "/unload_preset", {"name": "calm"}).status_code == 404
    assert "calm" not in {m.id for m in c.models.list().data}
    with pytest.raises(openai.NotFoundError):  # no longer a preset: vLLM's own answer to an unknown model
        c.completions.create(model="calm", prompt=PROMPTS[0], max_tokens=4)


@pytest.mark.parametrize("preset, message", [
    ("calm=nope:5", "preset 'calm': unknown steer 'nope'"),
    ("calm=alpha:500", "preset 'calm': steer_alpha = 500 is beyond the allowed range"),
    ("calm=alpha:[1,2,3]", "preset 'calm': steer_alpha expects a number or a list of 2 numbers"),
    ("MODEL=alpha:1", "has the name of the served model"),
    ("adapter=alpha:1", "has the name of a LoRA module"),
    ("calm=alpha", "each steer needs STEER:VALUE"),
    ("bad name=alpha:1", "must be letters, digits"),
])
def test_a_preset_that_cannot_be_served_stops_start_up_naming_it(preset, message, steer_paths, model_dir, capsys):
    """Before vLLM starts (vllm-steer serve reads the steers and vLLM's arguments first)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", str(model_dir), "--served-model-name", "smol", "--steer", f"alpha={steer_paths['alpha']}",
                  "--steer-preset", preset.replace("MODEL", "smol"), "--lora-modules", f"adapter={model_dir}",
                  "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
