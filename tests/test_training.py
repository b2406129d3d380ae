"""`vllm-steer train`: the cached-hidden-state trainer against the reference's recompute path,
padding, resuming, determinism, the learned direction, and the file it writes."""

from __future__ import annotations

import json

import pytest
import torch
from steer_toy import NEGATIVE, POSITIVE, make_toy_model, toy_sentiment_rows

from vllm_steer import SteerFile, embedding_fingerprint
from vllm_steer.cli import main as cli_main
from vllm_steer.steer.formula import steered_hidden
from vllm_steer.testing import recompute_step_loss
from vllm_steer.tools.hf_model import final_hidden_states, load_frozen_model, output_head
from vllm_steer.tools.hidden_cache import build_cache
from vllm_steer.tools.training import (
    TrainConfig,
    cached_step_loss,
    initial_projectors,
    prepare_examples,
    train_on_cache,
    training_vectors,
)
from vllm_steer.tools.training_data import LabelledText as Text
from vllm_steer.tools.training_data import file_sha256, load_labelled_file, load_text_pair


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = make_toy_model(tmp_path_factory.mktemp("toy_model"))
    lm, tokenizer = load_frozen_model(folder)
    return folder, lm, tokenizer


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_sentiment_rows()))
    return path


def examples_of(path) -> list[Text]:
    return load_labelled_file(path, ["sentiment"])


def cache_for(config, lm, tokenizer, examples):
    ids, labels = prepare_examples(config, tokenizer, examples)
    return ids, build_cache(lm, ids, labels)


def test_cached_loss_and_gradients_equal_full_recompute(toy, toy_data):
    """One step's loss and gradients on cached hidden states == running the model each step
    (the reference's way), on a batch whose texts have different lengths (so it is padded)."""
    _, lm, tokenizer = toy
    config = TrainConfig(dim_names=["sentiment"], rank=6, epsilon=0.05, init_std=0.3)
    ids, cache = cache_for(config, lm, tokenizer, examples_of(toy_data))
    vectors = training_vectors(config, cache.labels)
    batch = torch.tensor([0, 3, 7, 30, 41, 11])
    assert len({len(ids[i]) for i in batch.tolist()}) > 1  # padding is really involved
    weight, bias = output_head(lm)
    grads, losses = [], []
    for path in ("cached", "recompute"):
        p1, p2 = (p.requires_grad_(True) for p in initial_projectors(config, weight.shape[1]))
        if path == "cached":
            loss = cached_step_loss(config, cache, vectors, batch, p1, p2, weight, bias, "cpu")
        else:
            loss = recompute_step_loss(config, lm, ids, vectors, batch, p1, p2, "cpu")
        loss.backward()
        losses.append(loss.item())
        grads.append((p1.grad, p2.grad))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for cached, full in zip(grads[0], grads[1], strict=True):
        assert full.abs().max() > 0
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-7)


def test_padding_is_not_in_the_loss(toy, toy_data):
    """The padded batch's loss is the token-weighted mean of each text's own loss, whatever the
    pad id is."""
    _, lm, tokenizer = toy
    config = TrainConfig(dim_names=["sentiment"], rank=4, epsilon=0.05, init_std=0.3)
    ids, cache = cache_for(config, lm, tokenizer, examples_of(toy_data))
    vectors = training_vectors(config, cache.labels)
    p1, p2 = initial_projectors(config, lm.config.hidden_size)
    batch = torch.tensor([2, 29, 40])
    with torch.no_grad():
        padded = [recompute_step_loss(config, lm, ids, vectors, batch, p1, p2, "cpu", pad_id=pad).item()
                  for pad in (0, 5)]
        alone = [recompute_step_loss(config, lm, ids, vectors, batch[i:i + 1], p1, p2, "cpu").item()
                 for i in range(len(batch))]
    targets = [len(ids[i]) - 1 for i in batch.tolist()]
    expected = sum(loss * n for loss, n in zip(alone, targets, strict=True)) / sum(targets)
    assert padded[0] == pytest.approx(expected, rel=1e-5)
    assert padded[1] == pytest.approx(expected, rel=1e-5)


def test_hidden_state_is_what_feeds_the_lm_head():
    """On the real default model, h @ E^T reproduces the model's own logits: h is the post-norm
    final hidden state, not a pre-norm one."""
    from vllm_steer.tools.default_model import default_model_dir

    lm, tokenizer = load_frozen_model(default_model_dir())
    ids = torch.tensor([tokenizer("The weather today is lovely and")["input_ids"]])
    with torch.no_grad():
        h = final_hidden_states(lm, ids, torch.ones_like(ids))
        logits = lm(input_ids=ids).logits
    weight, _ = output_head(lm)
    torch.testing.assert_close(h @ weight.T, logits, rtol=1e-4, atol=1e-4)


def word_probs(lm, tokenizer, steer_values, p1, p2, eps, prompt="the movie was"):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        h = final_hidden_states(lm, ids, torch.ones_like(ids))[0, -1:]
        steered = steered_hidden(h, torch.tensor([steer_values]), p1, p2, eps)
        probs = torch.softmax(steered @ output_head(lm)[0].T, -1)[0]
    vocab = tokenizer.get_vocab()
    return (sum(probs[vocab[w]].item() for w in POSITIVE), sum(probs[vocab[w]].item() for w in NEGATIVE))


def test_training_reduces_loss_and_steers_in_the_labelled_direction(toy, toy_data):
    _, lm, tokenizer = toy
    config = TrainConfig(dim_names=["sentiment"], rank=8, epsilon=5e-2, steps=200, lr=2e-2, batch_size=16)
    _, cache = cache_for(config, lm, tokenizer, examples_of(toy_data))
    result = train_on_cache(config, cache, *output_head(lm))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    pos_up, neg_up = word_probs(lm, tokenizer, [1.0, 1.0], result.projector1, result.projector2, config.epsilon)
    pos_down, neg_down = word_probs(lm, tokenizer, [-1.0, 1.0], result.projector1, result.projector2, config.epsilon)
    assert pos_up > 2 * pos_down and neg_down > 2 * neg_up, (pos_up, pos_down, neg_up, neg_down)


def test_resume_gives_the_same_steer_as_one_run(toy, toy_data, tmp_path):
    _, lm, tokenizer = toy
    config = TrainConfig(dim_names=["sentiment"], rank=4, epsilon=1e-2, steps=12, batch_size=8, seed=3)
    _, cache = cache_for(config, lm, tokenizer, examples_of(toy_data))
    weight, bias = output_head(lm)
    whole = train_on_cache(config, cache, weight, bias)
    again = train_on_cache(config, cache, weight, bias)
    assert torch.equal(whole.projector1, again.projector1)  # deterministic with a seed
    ckpt = tmp_path / "run.ckpt"
    first = train_on_cache(config, cache, weight, bias, checkpoint=ckpt, checkpoint_every=100, stop_after=5)
    assert len(first.losses) == 5 and torch.load(ckpt, weights_only=True)["step"] == 5
    resumed = train_on_cache(config, cache, weight, bias, checkpoint=ckpt, resume=True)
    assert resumed.losses == whole.losses
    torch.testing.assert_close(resumed.projector1, whole.projector1, rtol=0, atol=0)
    torch.testing.assert_close(resumed.projector2, whole.projector2, rtol=0, atol=0)
    other = TrainConfig(**{**config.__dict__, "lr": 0.5})
    with pytest.raises(ValueError, match="another recipe"):
        train_on_cache(other, cache, weight, bias, checkpoint=ckpt, resume=True)


def test_cli_train_writes_a_complete_steer_file(toy, toy_data, tmp_path, capsys):
    folder, lm, _ = toy
    out = tmp_path / "sentiment.safetensors"
    cli_main(["train", "--data", str(toy_data), "--model", str(folder), "--name", "sentiment", "-o", str(out),
              "--steps", "6", "--rank", "5", "--batch-size", "8", "--l2", "1e-4", "--quiet",
              "--cache-dir", str(tmp_path / "cache")])
    assert list((tmp_path / "cache").glob("hidden-*.safetensors"))
    steer = SteerFile.load(out)
    h = steer.header
    assert h.dim_names == ("sentiment", "bias") and h.primary_dim == "sentiment" and h.bias_dims == {"bias": 1.0}
    assert (h.rank, h.epsilon, h.hidden_size) == (5, 1e-3, 32)
    assert steer.projector1.dtype == torch.bfloat16
    assert h.fingerprint == embedding_fingerprint(output_head(lm)[0])
    assert h.base_model == str(folder)
    r = h.recipe
    for key, value in {"lr": 0.01, "steps": 6, "batch_size": 8, "max_length": 256, "seed": 0, "l2": 1e-4,
                       "init_std": 0.01, "bias_value": 1.0}.items():
        assert r[key] == value, key
    data = r["data"]
    assert data["files"] == [{"path": str(toy_data), "sha256": file_sha256(toy_data)}]
    assert (data["examples"], data["positive"], data["negative"]) == (48, 24, 24)
    assert data["target_tokens"] > 0 and r["final_loss"] > 0
    assert not (tmp_path / "sentiment.safetensors.ckpt").exists()  # the side file goes once finished
    assert "wrote" in capsys.readouterr().out
    # --value-scale calibrates the trained dim only, exactly (0.5 is exact in bf16 too)
    half = tmp_path / "half.safetensors"
    cli_main(["train", "--data", str(toy_data), "--model", str(folder), "--name", "sentiment", "-o", str(half),
              "--steps", "6", "--rank", "5", "--batch-size", "8", "--l2", "1e-4", "--quiet",
              "--cache-dir", str(tmp_path / "cache"), "--value-scale", "0.5"])
    scaled = SteerFile.load(half)
    assert torch.equal(scaled.projector1, steer.projector1)
    assert torch.equal(scaled.projector2[0], steer.projector2[0] * 0.5)
    assert torch.equal(scaled.projector2[1], steer.projector2[1])
    assert scaled.header.recipe["value_scale"] == 0.5


def test_other_inputs_text_pairs_and_csv(tmp_path):
    (tmp_path / "pos.txt").write_text("good day\n\ngreat film\n")
    (tmp_path / "neg.txt").write_text("bad day\n")
    pair = load_text_pair(tmp_path / "pos.txt", tmp_path / "neg.txt")
    assert [(e.text, e.labels) for e in pair] == [("good day", (1.0,)), ("great film", (1.0,)), ("bad day", (-1.0,))]
    (tmp_path / "two.csv").write_text('text,formal,happy\n"Dear sir, thanks",1,0.5\nyo lol,-1,-0.5\n')
    rows = load_labelled_file(tmp_path / "two.csv", ["formal", "happy"])
    assert rows[1] == Text("yo lol", (-1.0, -0.5))
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": 3}\n')
    with pytest.raises(ValueError, match="not in"):
        load_labelled_file(tmp_path / "bad.jsonl", ["s"])


def check_training_device_matches_cpu(folder, data_path, device: str) -> None:
    """The hidden-state pass and the training on `device` give the CPU's cache and steer
    (fp32, so only summation order differs)."""
    config = TrainConfig(dim_names=["sentiment"], rank=8, epsilon=5e-2, steps=30, lr=2e-2, batch_size=16)
    runs = {}
    for where in ("cpu", device):
        lm, tokenizer = load_frozen_model(folder, device=where)
        ids, labels = prepare_examples(config, tokenizer, examples_of(data_path))
        cache = build_cache(lm, ids, labels, device=where)
        runs[where] = (cache, train_on_cache(config, cache, *output_head(lm), device=where))
    (cpu_cache, cpu), (dev_cache, dev) = runs["cpu"], runs[device]
    torch.testing.assert_close(dev_cache.hidden.cpu(), cpu_cache.hidden, rtol=1e-4, atol=1e-4)
    assert torch.equal(dev_cache.targets.cpu(), cpu_cache.targets)
    torch.testing.assert_close(torch.tensor(dev.losses), torch.tensor(cpu.losses), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dev.projector1, cpu.projector1, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (not verified on this CPU machine)")
def test_training_on_cuda_matches_cpu(toy, toy_data):
    check_training_device_matches_cpu(toy[0], toy_data, "cuda")
