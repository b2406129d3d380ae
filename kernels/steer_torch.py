"""The steer op in plain torch: the path used where Triton cannot run (the CPU backend) and the
reference the Triton kernel is tested against."""

import torch


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
