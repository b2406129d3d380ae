"""`vllm-steer keywords`: the words a steer dim promotes and suppresses, read from the SVD of its
matrix W_k, as in the paper's interpretability section.

With row vectors, steering by s on dim k changes token v's logit by eps * s * h W_k e_v, where
W_k = P1_k P2_k^T [D, D], h is the final hidden state and e_v the output embedding of v. The
SVD W_k = U S V^T splits that into directions i, each moving e_v's logit by its projection
e_v . v_i (times sigma_i and the context's h . u_i)."""

from __future__ import annotations

from typing import Any

import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.formula import dim_matrices

from .hf_model import final_hidden_states


def is_readable_word(piece: str, word_initial_only: bool = False) -> bool:
    """A decoded token that is an alphabetic (ASCII) word of two letters or more, spaces aside;
    with word_initial_only, also one that starts a word (a leading space), so that BPE fragments
    such as 'olks' or 'imbal' are left out."""
    word = piece.strip()
    if word_initial_only and not piece.startswith(" "):
        return False
    return len(word) >= 2 and word.isascii() and word.isalpha()


def readable_mask(pieces: list[str]) -> torch.Tensor:
    """Which tokens to list. Word-initial tokens only where the tokenizer marks them with a
    leading space when decoded alone (BPE vocabularies such as GPT-2's and SmolLM2's)."""
    spaced = sum(p.startswith(" ") for p in pieces) > 0.1 * len(pieces)
    return torch.tensor([is_readable_word(p, spaced) for p in pieces])


# Neutral sentences whose mean final hidden state stands for "a typical context" when the
# sign of a singular direction is fixed (see steer_keywords).
NEUTRAL_CONTEXT = [
    "The meeting is scheduled for Tuesday afternoon in the main building.",
    "She walked to the station and bought a ticket for the next train.",
    "The report describes the results of the survey in three sections.",
    "He opened the window, sat down at the table and started to write.",
    "The weather today is cloudy with a light wind from the west.",
]


@torch.no_grad()
def mean_context(lm, tokenizer, texts: list[str] | None = None) -> torch.Tensor:
    """The mean final hidden state over neutral text, [D]."""
    states = []
    for text in texts or NEUTRAL_CONTEXT:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        states.append(final_hidden_states(lm, ids, torch.ones_like(ids))[0].float())
    return torch.cat(states).mean(0)


def steer_keywords(steer: SteerFile, output_embedding: torch.Tensor, tokenizer, dim: str | None = None,
                   directions: int = 3, top: int = 12, context: torch.Tensor | None = None) -> dict[str, Any]:
    """For the top singular directions of W_k: the readable words whose output embedding
    projects most positively ("promoted") and most negatively ("suppressed") on v_i.

    A singular pair's sign is arbitrary (u, v -> -u, -v). It is fixed by a typical context h
    (`context`, the mean final hidden state over neutral text; the mean embedding row if not
    given): direction i changes token x's logit by eps * s * sigma_i (h . u_i)(v_i . e_x), so with
    the sign chosen to make h . u_i > 0, +1 on the dim raises the promoted words' logits."""
    k = steer.header.dim_index(dim)
    emb = output_embedding.float()
    if emb.shape[1] != steer.header.hidden_size:
        raise ValueError(f"the model's hidden size {emb.shape[1]} != the steer's {steer.header.hidden_size}")
    h = (context if context is not None else emb.mean(0)).float()
    u, s, vh = torch.linalg.svd(dim_matrices(steer.projector1[k:k + 1], steer.projector2[k:k + 1])[0])
    pieces = [tokenizer.decode([i]) for i in range(emb.shape[0])]
    readable = readable_mask(pieces)
    out = []
    for i in range(min(directions, int((s > s[0] * 1e-6).sum()))):
        proj = emb @ vh[i]
        alignment = float(h @ u[:, i])
        if alignment < 0:
            proj = -proj
        out.append({
            "direction": i,
            "singular_value": float(s[i]),
            "share_of_energy": float(s[i] ** 2 / (s**2).sum()),
            "context_alignment": abs(alignment) / max(float(h.norm()), 1e-12),
            "promoted": _ranked_words(proj, readable, pieces, top, descending=True),
            "suppressed": _ranked_words(proj, readable, pieces, top, descending=False),
        })
    return {"dim": steer.header.dim_names[k], "directions": out}


def _ranked_words(scores: torch.Tensor, readable: torch.Tensor, pieces: list[str], top: int,
                  descending: bool) -> list[dict[str, Any]]:
    order = torch.argsort(scores.masked_fill(~readable, float("-inf") if descending else float("inf")),
                          descending=descending)
    words, seen = [], set()
    for idx in order.tolist():
        if not readable[idx]:
            break
        word = pieces[idx].strip()
        if word.lower() in seen:
            continue
        seen.add(word.lower())
        words.append({"word": word, "token_id": idx, "score": round(float(scores[idx]), 4)})
        if len(words) == top:
            break
    return words


def keyword_table(result: dict[str, Any]) -> str:
    """The keywords as a plain-text table: one row per rank position, per direction."""
    lines = [f"steer dim: {result['dim']}"]
    for d in result["directions"]:
        lines.append(f"\ndirection {d['direction']}  (sigma {d['singular_value']:.4g}, "
                     f"{100 * d['share_of_energy']:.1f}% of |W|^2, |cos(context, u)| {d['context_alignment']:.2f})")
        lines.append(f"  {'#':>3}  {'promoted (+)':<22}{'suppressed (-)':<22}")
        for i in range(max(len(d["promoted"]), len(d["suppressed"]))):
            plus = d["promoted"][i]["word"] if i < len(d["promoted"]) else ""
            minus = d["suppressed"][i]["word"] if i < len(d["suppressed"]) else ""
            lines.append(f"  {i + 1:>3}  {plus:<22}{minus:<22}")
    return "\n".join(lines)
