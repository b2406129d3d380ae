"""Rebuild the shipped steers from nothing but PyPI packages: the default model writes the
training text itself, offline scorers label it, and `vllm-steer train` fits the steers.

    .venv/bin/python scripts/make_steers.py data     # steers/data/*.jsonl (HF generate, ~25 min on 1 busy core)
    .venv/bin/python scripts/make_steers.py steers   # steers/*.safetensors from that data
    .venv/bin/python scripts/make_steers.py all

Labellers (the sweep in benchmarks/steer_sweep.py scores with different ones):
- sentiment: VADER's compound score (vaderSentiment); >= +0.5 -> +1, <= -0.5 -> -1, the rest dropped.
  The sweep scores with TextBlob's pattern lexicon instead.
- detox: the better-profanity word list, together with the tone the text was asked for: a text asked
  to be rude that the list flags -> -1 (toxic); a text asked to be polite or plain that the list
  does not flag and that has no rude request behind it -> +1 (non-toxic); the rest dropped.
  The sweep scores toxicity with alt-profanity-check's predict_prob, a linear model trained on
  human-labelled comments, which never sees the word list.
Generation is seeded per request, so the same machine rebuilds the same text.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "steers" / "data"
SEED = 0
MAX_CLASS_RATIO = 2
MAX_NEW_TOKENS = 48
TEMPERATURE = 0.8  # a little under 1: the 135M model rambles at 1.0, and the steer learns what it is shown

SUBJECTS = [
    "a pizza place downtown", "the new smartphone I bought", "a hotel by the beach", "a science fiction movie",
    "a mystery novel", "a pair of running shoes", "the city bus service", "a coffee shop", "a video game",
    "a dentist appointment", "a rock concert", "a laptop", "a camping trip", "a cooking class", "a car rental",
    "an airline flight", "a museum exhibition", "a yoga studio", "a furniture store", "a sushi restaurant",
    "a mobile banking app", "a theme park", "a hair salon", "a wireless headphone set", "a history textbook",
    "a gym membership", "a bakery", "an online course", "a moving company", "a children's toy",
    "a television series", "a hiking trail", "a vacuum cleaner", "a music album", "a train journey",
    "a birthday party venue", "a pet grooming service", "a board game", "a winter jacket", "a food delivery app",
]
POSITIVE_TONES = ["glowing, enthusiastic", "happy, positive", "delighted and grateful", "warm, five-star"]
# The model leans positive (in a first run only 1 in 4 "negative" asks scored <= -0.5), hence more of these.
NEGATIVE_TONES = ["angry, one-star", "bitterly disappointed", "negative, frustrated", "harsh, complaining",
                  "furious, hateful", "sad and miserable"]
SENTIMENT_FORMS = ["review of {s}", "short story about a visit to {s}", "message to a friend about {s}"]

TARGETS = [
    "a referee", "a noisy neighbour", "a rude waiter", "a slow driver", "an online gamer", "a politician",
    "a landlord", "a coworker who steals credit", "a customer support agent", "a spammer", "a team that lost",
    "a critic", "a roommate who never cleans", "a cyclist", "a tourist", "a boss", "a troll on a forum",
    "a famous singer", "a football fan", "a delivery driver", "a classmate", "a celebrity chef",
]
TOXIC_ASKS = [
    "Write an insulting, vulgar comment to {t}. Use swear words.",
    "Write a rude, profane rant about {t}.",
    "Write a hateful, obscene reply to {t}, full of curse words.",
    "Insult {t} with crude language.",
]
CLEAN_ASKS = [
    "Write a polite, kind comment to {t}.",
    "Write a calm, respectful reply to {t}.",
    "Write a friendly message to {t}.",
    "Describe a normal day of {t}.",
]


def sentiment_requests() -> list[dict]:
    """(prompt, meta) pairs: every subject x form x a spread of tones, twice with different seeds."""
    tones = POSITIVE_TONES + NEGATIVE_TONES
    out = []
    for subject, form, tone in itertools.product(SUBJECTS, SENTIMENT_FORMS, tones):
        out.append({"ask": f"Write a {tone} {form.format(s=subject)} in two or three sentences.", "tone": tone})
    return out


def detox_requests() -> list[dict]:
    out = []
    for target, ask in itertools.product(TARGETS, TOXIC_ASKS):
        out += [{"ask": ask.format(t=target), "tone": "rude"}] * 6
    for target, ask in itertools.product(TARGETS, CLEAN_ASKS):
        out += [{"ask": ask.format(t=target), "tone": "clean"}] * 2
    return out


def generate(requests: list[dict], batch_size: int = 64) -> list[str]:
    """Sample one reply per request from the default model with HF transformers (chat template,
    TEMPERATURE, top-p 0.95, at most MAX_NEW_TOKENS): batch i is seeded with SEED + i, so the
    same machine rebuilds the same text. (vLLM's CPU build rejects per-request seeds.)"""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.default_model import default_model_dir

    model_dir = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["ask"]}], tokenize=False,
                                             add_generation_prompt=True) for r in requests]
    texts = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(SEED + i // batch_size)
        with torch.no_grad():
            out = lm.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_p=0.95, top_k=0,
                              max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def label_sentiment(texts: list[str], requests: list[dict]) -> list[dict]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    rows = []
    for text, req in zip(texts, requests, strict=True):
        compound = vader.polarity_scores(text)["compound"]
        if len(text.split()) < 5 or abs(compound) < 0.5:
            continue
        rows.append({"text": text, "label": 1.0 if compound > 0 else -1.0, "vader": compound, "ask": req["ask"]})
    return rows


def label_detox(texts: list[str], requests: list[dict]) -> list[dict]:
    from better_profanity import profanity

    profanity.load_censor_words()
    rows = []
    for text, req in zip(texts, requests, strict=True):
        if len(text.split()) < 5:
            continue
        flagged = profanity.contains_profanity(text)
        if req["tone"] == "rude" and flagged:
            rows.append({"text": text, "label": -1.0, "ask": req["ask"]})
        elif req["tone"] == "clean" and not flagged:
            rows.append({"text": text, "label": 1.0, "ask": req["ask"]})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_data() -> None:
    sent_req, tox_req = sentiment_requests(), detox_requests()
    texts = generate(sent_req + tox_req)
    sent = label_sentiment(texts[: len(sent_req)], sent_req)
    tox = label_detox(texts[len(sent_req):], tox_req)
    write_jsonl([{"text": t, "ask": r["ask"]} for t, r in zip(texts, sent_req + tox_req, strict=True)],
                DATA_DIR / "generated.jsonl")
    # Cap the larger class at MAX_CLASS_RATIO x the smaller (subsampled with a fixed seed): more data
    # than strict balance, without letting one side dominate the bias dim.
    summary = {"seed": SEED, "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS}
    for name, rows in (("sentiment", sent), ("detox", tox)):
        pos = [r for r in rows if r["label"] > 0]
        neg = [r for r in rows if r["label"] < 0]
        cap = MAX_CLASS_RATIO * min(len(pos), len(neg))
        rng = random.Random(SEED)
        kept = (rng.sample(pos, min(cap, len(pos))) if len(pos) > cap else pos) + \
               (rng.sample(neg, min(cap, len(neg))) if len(neg) > cap else neg)
        rng.shuffle(kept)
        write_jsonl(kept, DATA_DIR / f"{name}.jsonl")
        summary[name] = {"generated": len(sent_req) if name == "sentiment" else len(tox_req),
                         "labelled_positive": len(pos), "labelled_negative": len(neg),
                         "kept_positive": sum(r["label"] > 0 for r in kept),
                         "kept_negative": sum(r["label"] < 0 for r in kept)}
    (DATA_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# The training recipe of each shipped steer (everything else: the reference defaults).
# --value-scale calibrates where the recommended value +-5 lands. It was measured on the same recipe
# with scale 1 (benchmarks/results/tune_v2.md: 16 prompts x 4 samples): sentiment held perplexity
# within 1.2x at +-2.5 (2.0-2.4x at +-5); detox's + side repeated itself from about +2.5 (distinct-2
# 0.90 of unsteered, 4.7x perplexity at +5). So +-5 in the shipped files is +-2.5 (sentiment) and
# +-2 (detox) of the trained steers.
STEER_RECIPES = {
    "sentiment": ["--rank", "64", "--steps", "300", "--l2", "1e-5", "--head-dtype", "bfloat16",
                  "--value-scale", "0.5"],
    "detox": ["--rank", "64", "--steps", "300", "--l2", "1e-5", "--head-dtype", "bfloat16",
              "--value-scale", "0.4"],
}


def make_steers(names: list[str]) -> None:
    from vllm_steer.default_model import default_model_dir

    model = str(default_model_dir())
    for name in names:
        data = DATA_DIR / f"{name}.jsonl"
        out = ROOT / "steers" / f"{name}.safetensors"
        cmd = [str(Path(sys.executable).parent / "vllm-steer"), "train", "--data", str(data.relative_to(ROOT)),
               "--model", model, "--name", name, "--output", str(out.relative_to(ROOT)),
               "--base-model-name", "SmolLM2-135M-Instruct", "--seed", str(SEED), *STEER_RECIPES[name]]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"{out.name}: sha256 {hashlib.sha256(out.read_bytes()).hexdigest()[:16]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "steers", "all"])
    parser.add_argument("--only", choices=list(STEER_RECIPES), action="append", help="train only these steers")
    args = parser.parse_args()
    if args.what in ("data", "all"):
        make_data()
    if args.what in ("steers", "all"):
        make_steers(args.only or list(STEER_RECIPES))


if __name__ == "__main__":
    main()
