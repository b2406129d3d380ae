"""The steer op in plain torch: the reference the Triton kernel is tested against (on its [D, C]
layout), and the path used where Triton cannot run (the CPU backend, on the flat layout it reads as
embedding bags)."""

import torch
import torch.nn.functional as F


def steer_hidden_gather_torch(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    steer_cols: torch.Tensor,
    row_steer: torch.Tensor,
    row_values: torch.Tensor,
) -> torch.Tensor:
    """Per-row gather: each row pays only for the steers it names, fp32 accumulation.

    h'_b = h_b + sum_s sum_k row_values[b, s, k] * delta(n, k, h_b) over the steers n = row_steer[b, s]
    (-1: no steer), where steer n's dim k reads columns c = down_start + k*r .. + r of `down`:
    delta = (h_b @ down[:, c]) @ up[up_start + k*r .. + r] for a factored steer (up_start >= 0), and
    delta = h_b @ down[:, c] for a dense one (up_start = -1, r = D: down holds W_k = P1_k P2_k^T).

    hidden [B, D]; down [D, C] (every steer's P1_k, or W_k, side by side); up [U, D] (the factored
    steers' P2_k^T stacked); steer_cols [N, 4] int (down_start, K, r, up_start per steer);
    row_steer [B, S] int; row_values [B, S, Kmax] fp32 (eps folded in; dims beyond a steer's K are
    ignored). Rows that name no steer come back bit-identical. The (row, slot) pairs are grouped by
    steer, so each steer in use costs one or two GEMMs over the rows that use it and its weights are
    read once; loaded steers that no row names cost nothing.
    """
    out = hidden.clone()
    pairs = (row_steer >= 0).nonzero()  # [P, 2]: (row, slot)
    if pairs.numel() == 0:
        return out
    steers = row_steer[pairs[:, 0], pairs[:, 1]].long()
    order = torch.argsort(steers, stable=True)
    pairs, steers = pairs[order], steers[order]
    used, counts = torch.unique_consecutive(steers, return_counts=True)
    h = hidden.float()
    rows = pairs[:, 0]
    h_pairs, values = h[rows], row_values[rows, pairs[:, 1]].float()  # [P, D], [P, Kmax]
    parts, start = [], 0
    for (down_start, k, r, up_start), count in zip(steer_cols[used].tolist(), counts.tolist(), strict=True):
        hs, vs = h_pairs[start:start + count], values[start:start + count, :k]
        start += count
        shrunk = (hs @ down[:, down_start:down_start + k * r].float()).view(count, k, r)
        if up_start < 0:  # dense: each dim's W_k h is already in the output space (r = D)
            parts.append(torch.bmm(vs.unsqueeze(1), shrunk).squeeze(1))
        else:
            parts.append((shrunk * vs.unsqueeze(2)).view(count, k * r) @ up[up_start:up_start + k * r].float())
    delta = torch.zeros_like(h).index_add_(0, rows, torch.cat(parts))
    steered = (row_steer >= 0).any(dim=1)
    out[steered] = (h[steered] + delta[steered]).to(hidden.dtype)
    return out


# A steer named by this many (row, slot) pairs of a step is applied as GEMMs on its block (its weights
# read once for all of them) rather than as that many bags (each reading them again, from cache).
# Below it the bags win on CPU: a GEMM over a few rows runs at one thread's memory bandwidth, the bags
# on every thread (measured on 2 cores, D 576, K*r 128: 64 rows on one steer, the GEMMs 30% faster; 16
# rows each on 16 steers, the bags 30% faster).
GEMM_PAIRS = 32


def steer_hidden_bags_torch(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    steer_cols: torch.Tensor,
    row_steer: torch.Tensor,
    row_values: torch.Tensor,
) -> torch.Tensor:
    """Per-row gather on the flat layout: a few multi-threaded calls per step however many steers
    the rows name, each reading only those steers' weights, fp32 accumulation.

    The function of `steer_hidden_gather_torch`, with `down` flat: down [L] holds steer n's block
    [D, K*r] (its P1_k, or W_k if dense) row-major from element down_start, a multiple of K*r, so that
    the block is D whole rows of down viewed as [-1, K*r]. hidden [B, D]; up [U, D] fp32;
    steer_cols [N, 4] int (down_start, K, r, up_start); row_steer [B, S] int (-1: no steer);
    row_values [B, S, Kmax] fp32 (eps folded in). Rows that name no steer come back bit-identical.
    A (row, slot) pair is an embedding bag of D rows of its steer's block weighted by h (the shrink),
    then, for a factored steer, a bag of K*r rows of `up` weighted by the shrunk values (the expand):
    one call of each per distinct block width among the steers in use. A steer named by GEMM_PAIRS
    pairs or more is instead one or two GEMMs over its pairs.
    """
    out = hidden.clone()
    pairs = (row_steer >= 0).nonzero()  # [P, 2]: (row, slot)
    if pairs.numel() == 0:
        return out
    rows, slots = pairs[:, 0], pairs[:, 1]
    steer = row_steer[rows, slots].long()
    start, k, r, up_start = steer_cols[steer].long().unbind(1)
    h, values = hidden.float(), row_values[rows, slots].float()  # [B, D], [P, Kmax]
    d, device = h.shape[1], h.device
    # column c of a steer's block belongs to dim c // r: its shrunk value is scaled by that dim's value
    def scaled(shrunk: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        dim_of_col = torch.arange(shrunk.shape[1], device=device).unsqueeze(0) // r[sel].unsqueeze(1)
        return shrunk * values[sel].gather(1, dim_of_col)

    delta = torch.zeros_like(h)
    counts = torch.bincount(steer)
    heavy = counts[steer] >= GEMM_PAIRS
    for n in (counts >= GEMM_PAIRS).nonzero().flatten().tolist():
        sel = (steer == n).nonzero().squeeze(1)
        first = int(sel[0])
        w, us = int(k[first] * r[first]), int(up_start[first])
        block = down[int(start[first]):int(start[first]) + d * w].view(d, w)
        shrunk = scaled(h[rows[sel]] @ block, sel)
        part = shrunk.view(-1, w // d, d).sum(1) if us < 0 else shrunk @ up[us:us + w]
        delta.index_add_(0, rows[sel], part)
    width = torch.where(up_start < 0, -(k * r), k * r)  # a dense block's width negated: its own group
    for w in sorted(set(width[~heavy].tolist())):  # one group per block width (usually one)
        sel = ((width == w) & ~heavy).nonzero().squeeze(1)
        dense, w, count = w < 0, abs(w), sel.numel()
        bags = torch.arange(count, device=device)
        table = down[: down.numel() // w * w].view(-1, w)
        index = ((start[sel] // w).unsqueeze(1) + torch.arange(d, device=device)).flatten()
        shrunk = scaled(F.embedding_bag(index, table, bags * d, mode="sum",
                                        per_sample_weights=h[rows[sel]].flatten()), sel)  # [count, w]
        if dense:  # each dim's W_k h is already in the output space (r = D)
            part = shrunk.view(count, w // d, d).sum(1)
        else:
            index = (up_start[sel].unsqueeze(1) + torch.arange(w, device=device)).flatten()
            part = F.embedding_bag(index, up, bags * w, mode="sum", per_sample_weights=shrunk.flatten())
        delta.index_add_(0, rows[sel], part)
    steered = (row_steer >= 0).any(dim=1)
    out[steered] = (h[steered] + delta[steered]).to(hidden.dtype)
    return out
