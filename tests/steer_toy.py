"""A tiny random-weight Llama with a word-level tokenizer, saved as a transformers folder, for
the training and tool tests: a vocabulary of a few dozen readable words keeps every LM-head
step cheap, and the words make keyword checks legible."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a movie film food day was is it and very so really but i we they this that "
    "good great happy lovely wonderful bad awful sad terrible horrible "
    "table chair window blue green seven eight run walk"
).split()
POSITIVE = ["good", "great", "happy", "lovely", "wonderful"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible"]


def make_toy_model(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True, max_position_embeddings=128, pad_token_id=0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_sentiment_rows(n_each: int = 24, seed: int = 0) -> list[dict]:
    """Separable labelled text: a neutral opening, then positive or negative words."""
    g = torch.Generator().manual_seed(seed)
    openings = ["the movie was", "the food is", "this day was really", "it is so", "we think that film was"]
    rows = []
    for label, words in ((1.0, POSITIVE), (-1.0, NEGATIVE)):
        for i in range(n_each):
            picks = [words[int(j)] for j in torch.randint(len(words), (2 + i % 3,), generator=g)]
            rows.append({"text": f"{openings[i % len(openings)]} {' and '.join(picks)}", "label": label})
    return rows
