"""`vllm-steer explain`: the tokens and spans of a text that most indicate a steer dim's style, from
the per-token loss difference between steering the dim by +value and by -value."""

from __future__ import annotations

import html
from typing import Any

import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.formula import steered_hidden
from vllm_steer.steer.values import steer_values

from .hf_model import final_hidden_states, output_head


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
    k = steer.header.dim_index(dim)
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    plus = token_losses(steer, lm, ids, steer_values(steer.header, value, dim))
    minus = token_losses(steer, lm, ids, steer_values(steer.header, -value, dim))
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

