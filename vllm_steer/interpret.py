"""Reading a steer: which words a dimension promotes and suppresses (keywords), and which
tokens of a text most indicate its style (explain), as in the paper's interpretability section.

With row vectors, steering by s on dim k changes token v's logit by eps * s * h W_k e_v, where
W_k = P1_k P2_k^T [D, D], h is the final hidden state and e_v the output embedding of v. The
SVD W_k = U S V^T splits that into directions i, each moving e_v's logit by its projection
e_v . v_i (times sigma_i and the context's h . u_i)."""

from __future__ import annotations

import html
from typing import Any

import torch

from .steer_file import SteerFile
from .training import final_hidden_states, output_head, steered_hidden

# ---------------------------------------------------------------- keywords


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


def dim_index(steer: SteerFile, dim: str | None) -> int:
    names = steer.header.dim_names
    name = dim or steer.header.primary_dim
    if name not in names:
        raise ValueError(f"no dim {name!r} in this steer (dims: {list(names)})")
    return names.index(name)


def steer_matrix(steer: SteerFile, k: int) -> torch.Tensor:
    """W_k = P1_k P2_k^T in float32, [D, D]."""
    return steer.projector1[k].float() @ steer.projector2[k].float().T


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
    k = dim_index(steer, dim)
    emb = output_embedding.float()
    if emb.shape[1] != steer.header.hidden_size:
        raise ValueError(f"the model's hidden size {emb.shape[1]} != the steer's {steer.header.hidden_size}")
    h = (context if context is not None else emb.mean(0)).float()
    u, s, vh = torch.linalg.svd(steer_matrix(steer, k))
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


# ---------------------------------------------------------------- explain


def steer_values(steer: SteerFile, k: int, value: float) -> list[float]:
    """The steer's K values with dim k at `value`, bias dims at their fixed values."""
    vector = [steer.header.bias_dims.get(n, 0.0) for n in steer.header.dim_names]
    vector[k] = value
    return vector


@torch.no_grad()
def token_losses(steer: SteerFile, lm, token_ids: list[int], values: list[float]) -> torch.Tensor:
    """Per-token cross-entropy of tokens 1..T-1 under the steered model ([T-1])."""
    ids = torch.tensor([token_ids])
    h = final_hidden_states(lm, ids, torch.ones_like(ids))[0, :-1].float()
    weight, bias = output_head(lm)
    steered = steered_hidden(h, torch.tensor([values]).expand(len(h), -1), steer.projector1.float(),
                             steer.projector2.float(), steer.header.epsilon)
    logits = steered @ weight.float().T + (bias if bias is not None else 0)
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


def top_spans(diffs: list[float], max_span: int, count: int, sign: float) -> list[tuple[int, int, float]]:
    """Non-overlapping windows of up to max_span tokens with the largest sign * total,
    chosen greedily: (start, end exclusive, total)."""
    candidates = []
    for start in range(len(diffs)):
        total = 0.0
        for end in range(start + 1, min(len(diffs), start + max_span) + 1):
            total += diffs[end - 1]
            if sign * total > 0:
                candidates.append((sign * total, start, end, total))
    candidates.sort(key=lambda c: (-c[0], c[2] - c[1]))
    chosen: list[tuple[int, int, float]] = []
    for _, start, end, total in candidates:
        if all(end <= s or start >= e for s, e, _ in chosen):
            chosen.append((start, end, total))
            if len(chosen) == count:
                break
    return chosen


def explain_text(steer: SteerFile, lm, tokenizer, text: str, dim: str | None = None, value: float = 1.0,
                 max_span: int = 10, span_count: int = 5) -> dict[str, Any]:
    """Per-token evidence for the style: diff = loss(-value) - loss(+value), so a positive diff
    means the token is likelier under +value (it indicates the + side of the dim)."""
    k = dim_index(steer, dim)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    plus = token_losses(steer, lm, ids, steer_values(steer, k, value))
    minus = token_losses(steer, lm, ids, steer_values(steer, k, -value))
    diffs = [0.0] + (minus - plus).tolist()  # the first token has no prediction
    tokens = [tokenizer.decode([i]) for i in ids]
    spans = {}
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        spans[side] = [{"start": s, "end": e, "total": round(t, 5), "text": tokenizer.decode(ids[s:e])}
                       for s, e, t in top_spans(diffs, max_span, span_count, sign)]
    return {
        "dim": steer.header.dim_names[k], "value": value,
        "tokens": [{"token": t, "diff": round(d, 5)} for t, d in zip(tokens, diffs, strict=True)],
        "total": round(sum(diffs), 5),
        "spans": spans,
        "mean_loss_plus": float(plus.mean()), "mean_loss_minus": float(minus.mean()),
    }


def _shade(diff: float, scale: float) -> float:
    return min(1.0, abs(diff) / scale) if scale > 0 else 0.0


def explanation_terminal(result: dict[str, Any], color: bool = True) -> str:
    """The text with each token's background coloured by its diff (green: + side, red: - side)."""
    scale = max((abs(t["diff"]) for t in result["tokens"]), default=0.0)
    out = []
    for t in result["tokens"]:
        level = _shade(t["diff"], scale)
        if not color or level < 0.05:
            out.append(t["token"])
            continue
        shade = 1 + round(level * 4)  # 256-colour cube steps 1..5
        code = 16 + 6 * shade if t["diff"] > 0 else 16 + 36 * shade
        out.append(f"\x1b[48;5;{code}m\x1b[97m{t['token']}\x1b[0m")
    lines = [f"dim {result['dim']}: loss(-{result['value']:g}) - loss(+{result['value']:g}) per token; "
             f"total {result['total']:+.3f} ({'+' if result['total'] > 0 else '-'} side)", "".join(out), ""]
    for side, label in (("plus", f"+{result['dim']}"), ("minus", f"-{result['dim']}")):
        lines.append(f"spans most indicating {label}:")
        lines += [f"  {s['total']:+8.3f}  {s['text']!r}" for s in result["spans"][side]] or ["  (none)"]
    return "\n".join(lines)


def explanation_html(result: dict[str, Any]) -> str:
    """A standalone HTML page: tokens highlighted like the terminal view, diffs on hover."""
    scale = max((abs(t["diff"]) for t in result["tokens"]), default=0.0)
    parts = []
    for t in result["tokens"]:
        level = _shade(t["diff"], scale)
        rgb = "0,160,60" if t["diff"] > 0 else "210,40,40"
        parts.append(f'<span title="{t["diff"]:+.4f}" style="background:rgba({rgb},{level:.2f})">'
                     f"{html.escape(t['token'])}</span>")
    rows = "".join(f"<tr><td>{side}</td><td>{s['total']:+.3f}</td><td>{html.escape(s['text'])}</td></tr>"
                   for side in ("plus", "minus") for s in result["spans"][side])
    return (f"<!doctype html><meta charset='utf-8'><title>vllm-steer explain: {html.escape(result['dim'])}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            ".text{font-family:monospace;white-space:pre-wrap;line-height:1.8}td{padding:0 1em}</style>"
            f"<h2>dim {html.escape(result['dim'])}: loss(&minus;{result['value']:g}) &minus; loss(+{result['value']:g})"
            f"</h2><p>green: likelier under +{html.escape(result['dim'])}; red: likelier under "
            f"&minus;{html.escape(result['dim'])}; total {result['total']:+.3f}</p>"
            f"<div class='text'>{''.join(parts)}</div><h3>spans</h3><table>{rows}</table>")

