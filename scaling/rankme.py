"""RankMe effective rank of a set of representations (Garrido et al. 2023, "RankMe: Assessing the
Downstream Performance of Pretrained Self-Supervised Representations by Their Rank", arXiv 2210.02885,
eq. 1): with ``s_k`` the singular values of the ``[N, D]`` matrix of embeddings,

    p_k = s_k / sum_j s_j + eps,        RankMe = exp(-sum_k p_k log p_k)

a smooth count of the directions the rows use: 1 for rank-one rows, ``min(N, D)`` when every singular
value is equal. A collapsing data2vec teacher shows it falling long before its variance does.
The embeddings are used as they are (no centring), as in the paper.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # the paper's epsilon


@torch.no_grad()
def effective_rank(x_ND: torch.Tensor, eps: float = EPS) -> float:
    """RankMe of the rows of ``x_ND`` (computed in float64; NaN for an empty, all-zero or non-finite input:
    a step with a non-finite loss is skipped and reported, not crashed on here)."""
    x = x_ND.detach().reshape(-1, x_ND.shape[-1]).double()
    if not bool(torch.isfinite(x).all()):
        return float("nan")
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if s.numel() == 0 or not bool(total > 0):
        return float("nan")
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))
