"""data2vec v1 targets and regression loss (docs/data2vec.md §1.1-§1.3); all math in fp32.

Targets: each of the teacher's top-K taps is normalised per layer (instance norm over time or
layer norm over features, no affine), the K results are averaged, and the average is optionally
normalised again (docs/data2vec.md §1.2). The loss is summed over the masked positions; the
trainer divides by the GLOBAL masked count (docs/data2vec.md §1.1 item 5; fairseq
``model_criterion.py``).
The collapse monitors use all-reduce-able (count, sum, sum of squares) statistics
(docs/data2vec.md §1.3, fairseq ``compute_var``).

Padding masks follow fairseq: ``padding_mask_BT`` is True at padded positions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from scaling.config import ObjectiveConfig

__all__ = ["layer_target", "make_targets", "regression_loss", "variance_stats", "std_from_stats"]

_EPS = 1e-5  # F.instance_norm / F.layer_norm default


def _instance_norm(x_BTD: Tensor, padding_mask_BT: Optional[Tensor]) -> Tensor:
    """Per-sample, per-channel normalisation over time; biased variance, eps 1e-5, no affine.

    docs/data2vec.md §7.6: fairseq's ``F.instance_norm`` on B x C x T includes padded frames in
    the statistics. We CHOOSE to exclude them: a sample's targets
    then do not depend on how much padding its batch happens to have (so they do not change with
    the micro-batch split either). Without padding this is exactly ``F.instance_norm``. Padded
    positions of the output are set to 0 (they are never scored).
    """
    if padding_mask_BT is None:
        return F.instance_norm(x_BTD.transpose(1, 2), eps=_EPS).transpose(1, 2)
    valid = (~padding_mask_BT.bool()).unsqueeze(-1).to(x_BTD.dtype)  # [B,T,1]
    count = valid.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B,1,1]
    mean = (x_BTD * valid).sum(dim=1, keepdim=True) / count
    centred = (x_BTD - mean) * valid
    var = centred.square().sum(dim=1, keepdim=True) / count  # biased, as instance_norm
    return centred * torch.rsqrt(var + _EPS)


def layer_target(tap_BTD: Tensor, kind: str, padding_mask_BT: Optional[Tensor] = None) -> Tensor:
    """Normalise one teacher tap ``[B,T,D]`` in fp32: ``"instance"``, ``"layer"`` or ``"none"``."""
    x = tap_BTD.float()
    if kind == "instance":
        return _instance_norm(x, padding_mask_BT)
    if kind == "layer":
        # Per position over D: padding cannot leak into other positions.
        return F.layer_norm(x, x.shape[-1:], eps=_EPS)
    if kind == "none":
        return x
    raise ValueError(f"unknown target normalisation {kind!r} (expected instance | layer | none)")


def make_targets(taps: list[Tensor], cfg: ObjectiveConfig, padding_mask_BT: Optional[Tensor] = None) -> Tensor:
    """Targets ``[B,T,D]`` fp32: per-layer norm of each tap, average over the K taps, optional post-norm.

    docs/data2vec.md §1.2: v1 speech IN + mean of K=8; v1 text LN + mean of K=10; v1 vision ([DV]) LN +
    mean of K=6 + LN again. The caller passes exactly the K taps to average.
    """
    if not taps:
        raise ValueError("make_targets needs at least one teacher tap")
    y = layer_target(taps[0], cfg.layer_norm, padding_mask_BT)
    for t in taps[1:]:
        y = y + layer_target(t, cfg.layer_norm, padding_mask_BT)
    y = y / len(taps)
    if cfg.post_norm != "none":
        y = layer_target(y, cfg.post_norm, padding_mask_BT)
    return y


def regression_loss(pred_ND: Tensor, target_ND: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """fp32 scalar: the loss SUMMED over the N masked positions (the trainer divides by the global count).

    Per position: sum over D of (pred - target)^2 (``l2``) or of Smooth-L1 with ``cfg.beta``,
    times ``scale = cfg.loss_scale`` (None: 1/sqrt(D), fairseq ``loss_scale: null``).
    ``mean_over_dims`` divides by D as well: [DV] vision's mean reduction over N*D equals
    (sum over N and D) / D / N, the /N coming from the trainer (docs/data2vec.md §1.1, vision
    exception). That equality needs ``loss_scale: 1`` in the vision recipe.
    """
    pred = pred_ND.float()
    target = target_ND.float()
    D = pred.shape[-1]
    if cfg.loss == "l2":
        per_elem = F.mse_loss(pred, target, reduction="none")
    elif cfg.loss == "smooth_l1":
        per_elem = F.smooth_l1_loss(pred, target, reduction="none", beta=float(cfg.beta))
    else:
        raise ValueError(f"unknown loss {cfg.loss!r} (expected l2 | smooth_l1)")
    scale = float(cfg.loss_scale) if cfg.loss_scale is not None else 1.0 / math.sqrt(D)
    if cfg.mean_over_dims:
        scale = scale / D
    return per_elem.sum() * scale


def variance_stats(x_ND: Tensor) -> Tensor:
    """fp32 ``[1 + 2D]`` = (row count, per-dim sum, per-dim sum of squares); all-reduce by summing."""
    x = x_ND.detach().float().reshape(-1, x_ND.shape[-1])
    count = torch.full((1,), float(x.shape[0]), dtype=torch.float32, device=x.device)
    return torch.cat([count, x.sum(dim=0), x.square().sum(dim=0)])


def std_from_stats(stats: Tensor) -> float:
    """Mean over D of the std across all rows: sqrt(var + 1e-6) (docs/data2vec.md §1.3, fairseq
    ``compute_var``).

    Unbiased like fairseq: var = (sumsq - sum^2 / n) / (n - 1). Evaluated in float64 from the
    fp32 statistics. Returns NaN for fewer than 2 rows (no spread is defined; a NaN never trips
    a ``< threshold`` collapse guard).
    """
    s = stats.detach().double().cpu()
    D = (s.numel() - 1) // 2
    n = float(s[0])
    if n < 2:
        return float("nan")
    total, sumsq = s[1 : 1 + D], s[1 + D : 1 + 2 * D]
    var = ((sumsq - total.square() / n) / (n - 1)).clamp_min(0.0)
    return float(torch.sqrt(var + 1e-6).mean())
