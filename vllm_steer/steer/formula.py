"""The steer's math, in one place: the LM-Steer formula on a steer's projectors and each dim's matrix
W_k. Pure torch, no vLLM.

    h' = h + eps * sum_k s_k (h @ P1_k) @ P2_k^T  =  h (I + eps * sum_k s_k W_k),  W_k = P1_k P2_k^T

Training, interpretation, transfer and composition use these; serving packs the steers into a
`SteerBank` (steer/bank.py) for the per-row gather op, which the tests check against `steered_hidden`.
"""

from __future__ import annotations

import torch


def steered_hidden(hidden: torch.Tensor, values: torch.Tensor, projector1: torch.Tensor, projector2: torch.Tensor,
                   epsilon: float) -> torch.Tensor:
    """h + eps * sum_k s_k (h @ P1_k) @ P2_k^T for every row, in the reference's order and in
    the inputs' dtype (differentiable: training uses it).

    hidden [N, D]; values [N, K] (each row's s); projector1, projector2 [K, D, r].
    """
    k, d, r = projector1.shape
    shrunk = hidden @ projector1.permute(1, 0, 2).reshape(d, k * r)  # [N, K*r]: every h @ P1_k side by side
    shrunk = shrunk * values.repeat_interleave(r, dim=1)
    return hidden + epsilon * (shrunk @ projector2.permute(0, 2, 1).reshape(k * r, d))


def dim_matrices(projector1: torch.Tensor, projector2: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_k = P1_k @ P2_k^T for every dim, [K, D, D], computed in `dtype`.

    projector1, projector2 [K, D, r].
    """
    return projector1.to(dtype) @ projector2.to(dtype).transpose(1, 2)
