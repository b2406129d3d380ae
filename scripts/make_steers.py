"""Rebuild the shipped steers from nothing but PyPI packages: the default model writes the
training text itself, offline scorers label it, and `vllm-steer train` fits the steers.

    .venv/bin/python scripts/make_steers.py data     # steers/data/*.jsonl (HF generate, ~25 min on 2 busy cores)
    .venv/bin/python scripts/make_steers.py steers   # steers/*.safetensors from that data
    .venv/bin/python scripts/make_steers.py all
    .venv/bin/python scripts/make_steers.py all --only detox   # one steer's data and file; the other's untouched

Needs the labellers: `pip install -e .[sweep]`. Each steer's text is generated in its own call with its
own seeds (steers/data/generated_<name>.jsonl keeps every raw reply), so rebuilding one leaves the
other's data as it is.

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
import os
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
# Detox data: every clean ask is a reply, comment or complaint addressed to the SAME targets as the rude
# asks, in the same situations (annoyed, disagreeing, complaining), only polite: the two classes share
# genre and subject and differ in tone, so the steer learns tone, not genre (clean asks that merely
# describe the target teach rant-vs-description instead).
TOXIC_ASKS = [
    "Write an insulting, vulgar comment to {t}. Use swear words.",
    "Write a hateful, obscene reply to {t}, full of curse words.",
    "Write a furious, obscene comment to {t}, full of swear words.",
    "Write a vulgar, profane insult to {t}, full of curse words.",
]
CLEAN_ASKS = [
    "Write a polite, kind comment to {t}.",
    "Write a calm, respectful reply to {t}.",
    "Write a friendly message to {t}.",
    "Write a polite complaint to {t}, without any insults.",
    "Reply calmly and kindly to {t} who annoyed you.",
    "Write an honest but respectful comment about {t}.",
    "Write a short, gracious note thanking {t}.",
    "Write a comment to {t} that disagrees politely.",
]
TOXIC_REPEATS, CLEAN_REPEATS = 6, 2  # samples per (target, ask): 528 rude + 352 clean requests
DETOX_SEED_BASE = 1000  # detox batch i is seeded with DETOX_SEED_BASE + i (sentiment's with SEED + i)
# The sentiment data's last generation batch (batch size 64) holds its 48 last asks and these 16 asks,
# which are generated and dropped: with them the batch, hence the sentiment data, rebuilds bit-identically.
SENTIMENT_FILL = ([{"ask": "Write an insulting, vulgar comment to a referee. Use swear words.", "tone": "rude"}] * 6
                  + [{"ask": "Write a rude, profane rant about a referee.", "tone": "rude"}] * 6
                  + [{"ask": "Write a hateful, obscene reply to a referee, full of curse words.", "tone": "rude"}] * 4)


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
        out += [{"ask": ask.format(t=target), "tone": "rude"}] * TOXIC_REPEATS
    for target, ask in itertools.product(TARGETS, CLEAN_ASKS):
        out += [{"ask": ask.format(t=target), "tone": "clean"}] * CLEAN_REPEATS
    return out


def generate(requests: list[dict], batch_size: int = 64, seed_base: int = SEED,
             threads: int | None = None) -> list[str]:
    """Sample one reply per request from the default model with HF transformers (chat template,
    TEMPERATURE, top-p 0.95, at most MAX_NEW_TOKENS): batch i is seeded with seed_base + i, so the
    same machine rebuilds the same text. (vLLM's CPU build rejects per-request seeds.) `threads`
    fixes torch's thread count (part of what makes the floats, hence the samples, repeat)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.tools.default_model import default_model_dir

    if threads:
        torch.set_num_threads(threads)
    model_dir = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["ask"]}], tokenize=False,
                                             add_generation_prompt=True) for r in requests]
    texts = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed_base + i // batch_size)
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


def cap_classes(rows: list[dict]) -> list[dict]:
    """Cap the larger class at MAX_CLASS_RATIO x the smaller (subsampled with a fixed seed): more data
    than strict balance, without letting one side dominate."""
    pos = [r for r in rows if r["label"] > 0]
    neg = [r for r in rows if r["label"] < 0]
    cap = MAX_CLASS_RATIO * min(len(pos), len(neg))
    rng = random.Random(SEED)
    kept = (rng.sample(pos, min(cap, len(pos))) if len(pos) > cap else pos) + \
           (rng.sample(neg, min(cap, len(neg))) if len(neg) > cap else neg)
    rng.shuffle(kept)
    return kept


def make_data(names: list[str]) -> None:
    """Generate, label and write the data of the named steers; the other's files are left alone."""
    summary_path = DATA_DIR / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary |= {"seed": SEED, "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS}
    for name in names:
        if name == "sentiment":
            requests = sentiment_requests()
            texts = generate(requests + SENTIMENT_FILL)[: len(requests)]
            rows = label_sentiment(texts, requests)
            extra = {"seeds": f"batch i: {SEED} + i"}
        else:
            requests = detox_requests()
            # one torch thread: two stalled on the shared 2-core machine (OpenMP threads waiting on
            # each other while the other core was busy)
            texts = generate(requests, seed_base=DETOX_SEED_BASE, threads=1)
            rows = label_detox(texts, requests)
            extra = {"seeds": f"batch i: {DETOX_SEED_BASE} + i", "torch_threads": 1, "targets": len(TARGETS),
                     "rude_asks": len(TOXIC_ASKS), "rude_repeats": TOXIC_REPEATS,
                     "clean_asks": len(CLEAN_ASKS), "clean_repeats": CLEAN_REPEATS}
        write_jsonl([{"text": t, "ask": r["ask"]} for t, r in zip(texts, requests, strict=True)],
                    DATA_DIR / f"generated_{name}.jsonl")
        kept = cap_classes(rows)
        write_jsonl(kept, DATA_DIR / f"{name}.jsonl")
        summary[name] = {"generated": len(requests),
                         "labelled_positive": sum(r["label"] > 0 for r in rows),
                         "labelled_negative": sum(r["label"] < 0 for r in rows),
                         "kept_positive": sum(r["label"] > 0 for r in kept),
                         "kept_negative": sum(r["label"] < 0 for r in kept)} | extra
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# The training recipe of each shipped steer (everything else: the reference defaults).
# --value-scale calibrates where the recommended value +-5 lands.
# sentiment: measured on the same recipe with scale 1 (tuning run v2: 16 prompts x 4 samples):
# perplexity within 1.2x at +-2.5 (2.0-2.4x at +-5); so +-5 in the file is +-2.5 trained.
# detox, tuned on the same recipe with scale 1 (tuning runs detox v3a-c):
# - with --no-bias (value 0 = unsteered): +1.5..+2 lowered max toxicity 0.47 -> 0.22-0.28 at 1.3x
#   perplexity, +2.5 reached 1.6x, +5 repeated "apologize" (v3a, v3b);
# - with the bias dim (shipped): the bias alone does not raise toxicity (0.46 vs 0.48 unsteered) and it
#   lowers perplexity
#   (0.7x), so the trained dim can go further: +3 gave max toxicity 0.10 at 1.2x perplexity and
#   97% distinct-2 (v3c, 8 samples). So +-5 in the file is +-3 trained.
# Detox trains with one torch thread (OMP_NUM_THREADS=1), as its data was generated.
STEER_RECIPES = {
    "sentiment": ["--rank", "64", "--steps", "300", "--l2", "1e-5", "--head-dtype", "bfloat16",
                  "--value-scale", "0.5"],
    "detox": ["--rank", "64", "--steps", "300", "--l2", "1e-5", "--head-dtype", "bfloat16",
              "--value-scale", "0.6"],
}
STEER_ENV = {"detox": {"OMP_NUM_THREADS": "1"}}


def make_steers(names: list[str]) -> None:
    from vllm_steer.tools.default_model import default_model_dir

    model = str(default_model_dir())
    for name in names:
        data = DATA_DIR / f"{name}.jsonl"
        out = ROOT / "steers" / f"{name}.safetensors"
        cmd = [str(Path(sys.executable).parent / "vllm-steer"), "train", "--data", str(data.relative_to(ROOT)),
               "--model", model, "--name", name, "--output", str(out.relative_to(ROOT)),
               "--base-model-name", "SmolLM2-135M-Instruct", "--seed", str(SEED), *STEER_RECIPES[name]]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | STEER_ENV.get(name, {}))
        print(f"{out.name}: sha256 {hashlib.sha256(out.read_bytes()).hexdigest()[:16]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "steers", "all"])
    parser.add_argument("--only", choices=list(STEER_RECIPES), action="append",
                        help="make only these steers' data and files (repeatable; default: all)")
    args = parser.parse_args()
    if args.what in ("data", "all"):
        make_data(args.only or list(STEER_RECIPES))
    if args.what in ("steers", "all"):
        make_steers(args.only or list(STEER_RECIPES))


if __name__ == "__main__":
    main()
