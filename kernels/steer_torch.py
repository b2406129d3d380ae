"""Plain torch implementation of the fused steer op: the path used where Triton cannot
run (the CPU backend) and the reference the Triton kernel is tested against."""

import torch


def steer_hidden_torch(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    col_dim: torch.Tensor,
    row_values: torch.Tensor,
) -> torch.Tensor:
    """h'_b = h_b + ((h_b @ down) * row_values[b, col_dim]) @ up, fp32 accumulation.

    hidden [B, D]; down [D, R] (every steer dim's P1_k side by side); up [R, D] (the
    P2_k^T stacked); col_dim [R] (the steer dim each of the R columns belongs to);
    row_values [B, Ktot] fp32 (each row's steer values with eps folded in). Rows whose
    values are all zero come back bit-identical to the input.
    """
    h = hidden.float()
    shrunk = h @ down.float()
    shrunk = shrunk * row_values[:, col_dim]
    return (h + shrunk @ up.float()).to(hidden.dtype)


def steer_hidden_dense_torch(hidden: torch.Tensor, dense: torch.Tensor, row_values: torch.Tensor) -> torch.Tensor:
    """h'_b = h_b + sum_k row_values[b, k] * (h_b @ W_k), fp32 accumulation.

    dense [D, K*D] holds every W_k = P1_k @ P2_k^T side by side. The same function as
    `steer_hidden_torch` in one GEMM instead of two, and fewer FLOPs when the steers' average
    rank per dim is above D/2 (a reference checkpoint's rank is D or more).
    """
    h = hidden.float()
    rows, size = h.shape
    per_dim = (h @ dense.float()).view(rows, row_values.shape[1], size)
    delta = torch.bmm(row_values.unsqueeze(1), per_dim).squeeze(1)
    return (h + delta).to(hidden.dtype)
