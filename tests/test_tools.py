"""inspect, keywords, explain, transfer and compose on constructed cases whose right answer is
known."""

from __future__ import annotations

import json

import pytest
import torch
from steer_toy import make_toy_model

from vllm_steer import SteerFile, embedding_fingerprint, testing
from vllm_steer.cli import main as cli_main
from vllm_steer.steer.formula import steered_hidden
from vllm_steer.steer.values import steer_values
from vllm_steer.tools.compose import compose_steers
from vllm_steer.tools.explain import explain_text, explanation_html, explanation_terminal
from vllm_steer.tools.hf_model import final_hidden_states, load_frozen_model, output_head
from vllm_steer.tools.keywords import mean_context, steer_keywords
from vllm_steer.tools.transfer import fit_embedding_map, shared_vocabulary, transfer_between_models, transfer_steer


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = make_toy_model(tmp_path_factory.mktemp("toy_model"))
    lm, tokenizer = load_frozen_model(folder)
    return folder, lm, tokenizer


def random_steer(dims, d=32, rank=4, seed=0, eps=1e-3, bias=None, fingerprint=None) -> SteerFile:
    return testing.random_steer(dims, d, rank, seed=seed, epsilon=eps, bias_dims=bias or {},
                                      fingerprint=fingerprint)


def word_steer(lm, tokenizer, word: str, sign: float) -> SteerFile:
    """Rank-1 steer W = sign * c v^T with c the mean context and v the word's embedding:
    +1 raises that word's logit in any context like c (sign +1) or lowers it (sign -1)."""
    c = mean_context(lm, tokenizer)
    e = output_head(lm)[0][tokenizer.get_vocab()[word]]
    p1 = torch.stack([sign * c / c.norm(), torch.randn(32)])[:, :, None]
    p2 = torch.stack([e / e.norm(), torch.zeros(32)])[:, :, None]
    return SteerFile.create(p1, p2, dim_names=["style", "bias"], epsilon=1.0, bias_dims={"bias": 1.0})


def test_inspect_prints_the_header(tmp_path, capsys):
    path = tmp_path / "s.safetensors"
    random_steer(["sentiment", "bias"], rank=7, bias={"bias": 1.0}).with_header(base_model="M").save(path)
    cli_main(["inspect", str(path)])
    out = capsys.readouterr().out
    for expected in ("sentiment", "rank r: 7", "epsilon: 0.001", "parameters: 896", "base model: M",
                     "fingerprint: no", '{"bias": 1.0}'):
        assert expected in out, expected
    cli_main(["inspect", str(path), "--json"])
    assert json.loads(capsys.readouterr().out)["rank r"] == 7


def test_the_steer_tools_import_no_vllm(tmp_path):
    """Every subcommand but `serve` runs without importing vLLM (its import costs seconds and hundreds of MiB):
    the package, the CLI and a tool, in a fresh interpreter."""
    import subprocess
    import sys

    path = tmp_path / "s.safetensors"
    random_steer(["s", "bias"], bias={"bias": 1.0}).save(path)
    code = ("import sys; from vllm_steer.cli import main; main(['inspect', sys.argv[1]]); "
            "print('vllm imported' if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 'no vllm')")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no vllm"), done.stdout[-2000:]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_keywords_find_the_word_a_constructed_steer_moves(toy, sign):
    _, lm, tokenizer = toy
    steer = word_steer(lm, tokenizer, "wonderful", sign)
    result = steer_keywords(steer, output_head(lm)[0], tokenizer, directions=1, top=5,
                            context=mean_context(lm, tokenizer))
    side = "promoted" if sign > 0 else "suppressed"
    assert result["dim"] == "style"
    assert result["directions"][0][side][0]["word"] == "wonderful"
    words = [w["word"] for d in result["directions"] for s in ("promoted", "suppressed") for w in d[s]]
    assert all(w.isalpha() for w in words)  # [PAD], [UNK] never appear
    # the keyword's logit really moves the claimed way under +1, in the typical context
    h = mean_context(lm, tokenizer)[None]
    w_id = tokenizer.get_vocab()["wonderful"]
    e = output_head(lm)[0]
    base = (h @ e.T)[0, w_id]
    moved = (steered_hidden(h, torch.tensor([[1.0, 0.0]]), steer.projector1, steer.projector2, 1.0) @ e.T)[0, w_id]
    assert (moved - base) * sign > 0


def test_keywords_cli_table_and_json(toy, tmp_path, capsys):
    folder, lm, tokenizer = toy
    path = tmp_path / "w.safetensors"
    word_steer(lm, tokenizer, "terrible", 1.0).save(path)
    cli_main(["keywords", str(path), "--model", str(folder), "--directions", "1", "--top", "3"])
    table = capsys.readouterr().out
    assert "promoted" in table and table.splitlines()[4].split()[1] == "terrible"
    cli_main(["keywords", str(path), "--model", str(folder), "--json", "--directions", "1"])
    assert json.loads(capsys.readouterr().out)["directions"][0]["promoted"][0]["word"] == "terrible"


def test_explain_marks_the_tokens_the_steer_favours(toy, tmp_path, capsys):
    """A rank-1 steer built from the context before "wonderful": +1 raises exactly that word there."""
    folder, lm, tokenizer = toy
    text = "the day was blue and the film was wonderful and seven"
    ids = tokenizer(text)["input_ids"]
    at = ids.index(tokenizer.get_vocab()["wonderful"])
    with torch.no_grad():
        c = final_hidden_states(lm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, at - 1]
    e = output_head(lm)[0][ids[at]]
    steer = SteerFile.create((c / c.norm())[None, :, None], (e / e.norm())[None, :, None] * 3, dim_names=["style"],
                             epsilon=1.0)
    result = explain_text(steer, lm, tokenizer, text, value=1.0, max_span=3, span_count=2)
    diffs = {t["token"].strip(): t["diff"] for t in result["tokens"]}
    assert max(diffs, key=diffs.get) == "wonderful"
    assert diffs["wonderful"] > 0 and result["tokens"][0]["diff"] == 0.0
    best = result["spans"]["plus"][0]
    assert "wonderful" in best["text"] and best["end"] - best["start"] <= 3
    assert best["total"] == pytest.approx(sum(t["diff"] for t in result["tokens"][best["start"]:best["end"]]), abs=1e-4)
    assert "\x1b[48;5;" in explanation_terminal(result) and "\x1b[" not in explanation_terminal(result, color=False)
    assert "wonderful</span>" in explanation_html(result)
    path = tmp_path / "s.safetensors"
    steer.save(path)
    html_path = tmp_path / "e.html"
    cli_main(["explain", str(path), text, "--model", str(folder), "--html", str(html_path), "--no-color"])
    assert "wonderful" in capsys.readouterr().out and html_path.read_text().startswith("<!doctype html>")


def test_compose_equals_applying_each_steer(tmp_path):
    """Composed file with values (a, b) == A with a plus B with b, with different ranks, eps and
    a scale folded in."""
    a = random_steer(["tone", "bias"], rank=3, seed=1, eps=1e-3, bias={"bias": 1.0})
    b = random_steer(["detox"], rank=6, seed=2, eps=4e-3)
    paths = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    a.save(paths["a"])
    b.save(paths["b"])
    out = tmp_path / "ab.safetensors"
    cli_main(["compose", f"a={paths['a']}", f"b={paths['b']}", "-o", str(out), "--scale", "b=2"])
    c = SteerFile.load(out)
    assert c.header.dim_names == ("a_tone", "a_bias", "b_detox") and c.header.rank == 6
    assert c.header.bias_dims == {"a_bias": 1.0} and c.header.primary_dim == "a_tone"
    assert steer_values(c.header, 3.0) == [3.0, 1.0, 0.0]
    h = torch.randn(5, 32)
    for va, vb in [(3.0, -2.0), (-5.0, 0.5), (0.0, 0.0)]:
        separate = (steered_hidden(h, torch.tensor([[va, 1.0]]).expand(5, -1), a.projector1, a.projector2, 1e-3)
                    + steered_hidden(h, torch.tensor([[2 * vb]]).expand(5, -1), b.projector1, b.projector2, 4e-3)
                    - h)
        together = steered_hidden(h, torch.tensor([[va, 1.0, vb]]).expand(5, -1), c.projector1, c.projector2,
                                  c.header.epsilon)
        torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="match no source"):
        compose_steers(paths, scales={"nope": 2})
    with pytest.raises(ValueError, match="different models"):
        fp = embedding_fingerprint(torch.randn(10, 32))
        compose_steers({"a": a.with_header(fingerprint=fp), "b": b.with_header(fingerprint={**fp, "sums": [0] * 10})})


def test_transfer_map_recovers_a_rotation_and_moves_the_steer_exactly():
    """If E_to = E_from Q^T (a rotated copy), the least-squares map is Q and the transferred
    steer gives the same logits on the target as the original on the source."""
    g = torch.Generator().manual_seed(0)
    e_from = torch.randn(300, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    e_to = e_from @ q.T
    b, fit = fit_embedding_map(e_from, e_to)
    torch.testing.assert_close(b, q, rtol=1e-4, atol=1e-4)
    assert fit["r2"] > 0.9999 and fit["relative_residual"] < 1e-5
    steer = random_steer(["s", "bias"], d=16, rank=3, bias={"bias": 1.0})
    moved = transfer_steer(steer, b)
    h = torch.randn(4, 16, generator=g)
    values = torch.tensor([[2.0, 1.0]]).expand(4, -1)
    logits_from = steered_hidden(h, values, steer.projector1, steer.projector2, 1e-3) @ e_from.T
    logits_to = steered_hidden(h @ q.T, values, moved.projector1, moved.projector2, 1e-3) @ e_to.T
    torch.testing.assert_close(logits_to, logits_from, rtol=1e-4, atol=1e-4)
    unit = transfer_steer(steer, b * 3.0, normalize_rows=True)
    torch.testing.assert_close(unit.projector1, moved.projector1, rtol=1e-4, atol=1e-4)


def test_transfer_between_models_identity_and_shared_vocabulary(toy, tmp_path):
    folder, lm, tokenizer = toy
    assert shared_vocabulary(tokenizer, 40, tokenizer, 40)[0] == list(range(2, 40))  # special tokens left out
    steer = random_steer(["s", "bias"], bias={"bias": 1.0}, fingerprint=embedding_fingerprint(output_head(lm)[0]))
    src = tmp_path / "s.safetensors"
    steer.save(src)
    moved, report = transfer_between_models(src, folder, folder)
    assert report["r2"] > 0.9999 and report["primary_dim_norm_ratio"] == pytest.approx(1.0, rel=1e-3)
    torch.testing.assert_close(moved.projector1, steer.projector1, rtol=1e-3, atol=1e-3)
    other = make_toy_model(tmp_path / "other", hidden_size=48, seed=1)
    out = tmp_path / "moved.safetensors"
    cli_main(["transfer", str(src), "--from", str(folder), "--to", str(other), "-o", str(out)])
    m = SteerFile.load(out)
    assert m.header.hidden_size == 48 and m.header.rank == 4 and m.header.epsilon == 1e-3
    assert m.header.fingerprint == embedding_fingerprint(load_frozen_model(other)[0].get_output_embeddings().weight)
    assert m.header.recipe["transfer"]["shared_tokens"] == 38
