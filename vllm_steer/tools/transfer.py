"""`vllm-steer transfer`: move a steer to another model, the paper's "explicit form" transfer.

Over the tokens both tokenizers share, fit a linear map B [D_to, D_from] with E_to[v] ~ B E_from[v]
(closed-form least squares, no optimiser), then P1' = B P1_k and P2' = B P2_k, i.e. W' = B W B^T;
eps is unchanged. The reference also scales each row of B to unit length after its
gradient-descent fit; that is offered (normalize_rows) but off by default, because the least-squares
B already carries the scale between the two embedding spaces, and unit rows would change the
strength of the steer by an arbitrary, model-dependent factor (the report shows the factor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vllm_steer.steer.file import SteerFile
from vllm_steer.steer.fingerprint import embedding_fingerprint
from vllm_steer.steer.formula import dim_matrices

from .hf_model import load_frozen_model, output_head


def load_embedding_and_tokenizer(model: str | Path) -> tuple[torch.Tensor, Any]:
    """The output embedding [V, D] and tokenizer of a transformers model folder or name, or of
    a .gguf file."""
    lm, tokenizer = load_frozen_model(model)
    return output_head(lm)[0].float(), tokenizer


def token_strings(tokenizer, vocab_size: int) -> dict[str, int]:
    """Decoded text -> token id, for ids below vocab_size whose text is unique and non-empty.
    Decoded text (not the raw token) is compared, so GPT-2's 'Ġx' and SentencePiece's '▁x' meet."""
    seen: dict[str, int] = {}
    dup: set[str] = set()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in range(min(vocab_size, len(tokenizer))):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if not text or "\ufffd" in text:
            continue
        if text in seen:
            dup.add(text)
        seen.setdefault(text, token_id)
    return {t: i for t, i in seen.items() if t not in dup}


def shared_vocabulary(source_tokenizer, source_vocab: int, target_tokenizer, target_vocab: int,
                      max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Aligned id lists (source ids, target ids) of the tokens both vocabularies hold, in the
    target's id order (the reference keeps the first 4000 in that order; max_tokens does that)."""
    source = token_strings(source_tokenizer, source_vocab)
    target = token_strings(target_tokenizer, target_vocab)
    pairs = sorted((tid, source[text]) for text, tid in target.items() if text in source)
    if max_tokens is not None:
        pairs = pairs[:max_tokens]
    return [s for _, s in pairs], [t for t, _ in pairs]


def fit_embedding_map(source_rows: torch.Tensor, target_rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """B [D_to, D_from] minimising |source_rows B^T - target_rows|_F, and the fit: R^2 (against
    the target rows' column means) and the relative residual |residual|_F / |target|_F."""
    x, y = source_rows.double(), target_rows.double()
    solution = torch.linalg.lstsq(x, y, driver="gelsd").solution  # [D_from, D_to]
    residual = y - x @ solution
    total = (y - y.mean(0)).pow(2).sum()
    fit = {
        "r2": float(1 - residual.pow(2).sum() / total),
        "relative_residual": float(residual.norm() / y.norm()),
        "shared_tokens": int(x.shape[0]),
    }
    return solution.T.float(), fit


def transfer_steer(steer: SteerFile, embedding_map: torch.Tensor, normalize_rows: bool = False) -> SteerFile:
    """P1' = B P1_k, P2' = B P2_k for every dim (eps unchanged); the header keeps names, bias
    dims and recipe, and loses the old fingerprint (the caller sets the target's)."""
    b = embedding_map.float()
    if normalize_rows:
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if b.shape[1] != steer.header.hidden_size:
        raise ValueError(f"the map takes D={b.shape[1]}, the steer has D={steer.header.hidden_size}")
    p1 = torch.einsum("ed,kdr->ker", b, steer.projector1.float())
    p2 = torch.einsum("ed,kdr->ker", b, steer.projector2.float())
    h = steer.header
    return SteerFile.create(p1, p2, dim_names=h.dim_names, epsilon=h.epsilon, primary_dim=h.primary_dim,
                            bias_dims=dict(h.bias_dims), recipe=h.recipe, max_abs_value=h.max_abs_value)


def transfer_between_models(steer_path: str | Path, source_model: str | Path, target_model: str | Path,
                            normalize_rows: bool = False, max_tokens: int | None = None,
                            base_model: str | None = None) -> tuple[SteerFile, dict[str, Any]]:
    """Transfer the steer at `steer_path` from source_model to target_model; returns the new
    steer (fingerprinted for the target) and a report of the fit."""
    steer = SteerFile.load(steer_path)
    source_emb, source_tok = load_embedding_and_tokenizer(source_model)
    target_emb, target_tok = load_embedding_and_tokenizer(target_model)
    if source_emb.shape[1] != steer.header.hidden_size:
        raise ValueError(f"{source_model} has D={source_emb.shape[1]}, the steer D={steer.header.hidden_size}: "
                         "--from must be the model the steer was trained for")
    src_ids, tgt_ids = shared_vocabulary(source_tok, source_emb.shape[0], target_tok, target_emb.shape[0], max_tokens)
    if len(src_ids) < source_emb.shape[1]:
        raise ValueError(f"only {len(src_ids)} shared tokens, fewer than D_from={source_emb.shape[1]}: "
                         "the map would be underdetermined")
    b, fit = fit_embedding_map(source_emb[src_ids], target_emb[tgt_ids])
    moved = transfer_steer(steer, b, normalize_rows)
    k = steer.header.primary_index
    w = dim_matrices(steer.projector1[k:k + 1], steer.projector2[k:k + 1])
    w_new = dim_matrices(moved.projector1[k:k + 1], moved.projector2[k:k + 1])
    report = {
        **fit,
        "source_model": str(source_model), "target_model": str(target_model),
        "source_hidden_size": int(source_emb.shape[1]), "target_hidden_size": int(target_emb.shape[1]),
        "normalize_rows": normalize_rows,
        "primary_dim_norm_ratio": float(w_new.norm() / w.norm()),
    }
    recipe = {**(steer.header.recipe or {}), "transfer": report}
    moved = moved.with_header(base_model=base_model or str(target_model), fingerprint=embedding_fingerprint(target_emb),
                              recipe=recipe, source=f"transferred from {Path(steer_path).name} "
                                                    f"({steer.header.base_model}) with vllm-steer transfer")
    return moved, report
