"""Targets and loss (docs/data2vec.md §1.2) against plain per-sample / per-channel loops; variance
stats (§1.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaling.config import ObjectiveConfig
from scaling.objective import layer_target, make_targets, regression_loss, std_from_stats, variance_stats

# The three columns of the docs/data2vec.md §1.2 table.
SPEECH = ObjectiveConfig(top_k=8, layer_norm="instance", post_norm="none", loss="l2", loss_scale=None)
TEXT = ObjectiveConfig(top_k=10, layer_norm="layer", post_norm="none", loss="smooth_l1", beta=4.0, loss_scale=1.0)
# [DV] vision: smooth-L1 beta 2 with a mean over all masked elements; loss_scale 1 so that the
# only scaling is the 1/D of mean_over_dims (the trainer supplies the 1/N).
VISION = ObjectiveConfig(
    top_k=6, layer_norm="layer", post_norm="layer", loss="smooth_l1", beta=2.0, loss_scale=1.0, mean_over_dims=True
)


# ----------------------------------------------------------------------------- loop references
def ref_norm(x_BTD: torch.Tensor, kind: str, lengths: list[int]) -> torch.Tensor:
    """Normalisation by explicit loops over valid positions only; padded positions left at 0."""
    B, T, D = x_BTD.shape
    out = torch.zeros(B, T, D, dtype=torch.float64)
    x = x_BTD.double()
    for b in range(B):
        n = lengths[b]
        if kind == "instance":
            for d in range(D):
                v = x[b, :n, d]
                out[b, :n, d] = (v - torch.mean(v)) / torch.sqrt(torch.var(v, unbiased=False) + 1e-5)
        elif kind == "layer":
            for t in range(n):
                v = x[b, t]
                out[b, t] = (v - torch.mean(v)) / torch.sqrt(torch.var(v, unbiased=False) + 1e-5)
        elif kind == "none":
            out[b, :n] = x[b, :n]
        else:
            raise AssertionError(kind)
    return out


def ref_targets(taps, cfg: ObjectiveConfig, lengths):
    acc = sum(ref_norm(t, cfg.layer_norm, lengths) for t in taps) / len(taps)
    if cfg.post_norm != "none":
        acc = ref_norm(acc, cfg.post_norm, lengths)
    return acc


def ref_loss(pred_ND: torch.Tensor, target_ND: torch.Tensor, cfg: ObjectiveConfig) -> float:
    N, D = pred_ND.shape
    p, y = pred_ND.double().tolist(), target_ND.double().tolist()
    scale = cfg.loss_scale if cfg.loss_scale is not None else 1 / math.sqrt(D)
    if cfg.mean_over_dims:
        scale /= D
    total = 0.0
    for i in range(N):
        row = 0.0
        for j in range(D):
            d = p[i][j] - y[i][j]
            if cfg.loss == "l2":
                row += d * d
            elif abs(d) < cfg.beta:
                row += 0.5 * d * d / cfg.beta
            else:
                row += abs(d) - 0.5 * cfg.beta
        total += row * scale
    return total


def _padding(lengths, T):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # True = padded


@pytest.mark.parametrize("name,cfg", [("speech", SPEECH), ("text", TEXT), ("vision", VISION)])
def test_targets_and_loss_match_loop_reference(name, cfg):
    g = torch.Generator().manual_seed(0)
    B, T, D = 3, 13, 16
    lengths = [13, 9, 11]
    pad = _padding(lengths, T)
    # taps with a per-channel offset and scale, as real activations have
    taps = [
        torch.randn(B, T, D, generator=g) * (1 + torch.rand(D, generator=g) * 3) + torch.randn(D, generator=g) * 2
        for _ in range(cfg.top_k)
    ]
    y = make_targets(taps, cfg, pad)
    assert y.dtype == torch.float32 and y.shape == (B, T, D)
    y_ref = ref_targets(taps, cfg, lengths)
    valid = ~pad
    torch.testing.assert_close(y[valid].double(), y_ref[valid], atol=2e-5, rtol=1e-5)

    # loss at a random subset of valid positions ("masked")
    sel = valid & (torch.rand(B, T, generator=g) < 0.5)
    sel[0, 0] = True
    pred = torch.randn(int(sel.sum()), D, generator=g) * 3  # |d| spans both Smooth-L1 branches
    tgt = y[sel]
    loss = regression_loss(pred, tgt, cfg)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = ref_loss(pred, tgt, cfg)
    assert abs(loss.item() - expected) <= 1e-5 * max(1.0, abs(expected))


def test_vision_mean_reduction_equals_dv_mean_over_elements():
    # [DV] F.smooth_l1_loss(pred, target, beta=2) with the default mean reduction, written out.
    g = torch.Generator().manual_seed(1)
    N, D = 37, 24
    pred, tgt = torch.randn(N, D, generator=g) * 3, torch.randn(N, D, generator=g)
    d = (pred - tgt).double()
    elem = torch.where(d.abs() < 2.0, 0.5 * d * d / 2.0, d.abs() - 1.0)
    per_element_mean = elem.sum() / (N * D)
    assert abs(regression_loss(pred, tgt, VISION).item() / N - per_element_mean.item()) < 1e-6


def test_speech_scale_is_inverse_sqrt_dim():
    g = torch.Generator().manual_seed(2)
    pred, tgt = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    plain = ((pred.double() - tgt.double()) ** 2).sum().item()
    assert abs(regression_loss(pred, tgt, SPEECH).item() - plain / 8.0) < 1e-4


def test_bf16_prediction_is_cast_to_fp32():
    g = torch.Generator().manual_seed(3)
    pred, tgt = torch.randn(11, 32, generator=g).bfloat16(), torch.randn(11, 32, generator=g)
    for cfg in (SPEECH, TEXT, VISION):
        loss = regression_loss(pred, tgt, cfg)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - ref_loss(pred.float(), tgt, cfg)) < 1e-4
    y = make_targets([torch.randn(2, 5, 8, generator=g).bfloat16()], SPEECH)
    assert y.dtype == torch.float32


def test_instance_norm_without_padding_is_f_instance_norm():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 20, generator=g) * 4 + 7
    ref = F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    no_pad = torch.zeros(3, 50, dtype=torch.bool)
    torch.testing.assert_close(layer_target(x, "instance", None), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer_target(x, "instance", no_pad), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer_target(x, "layer", None), F.layer_norm(x, (20,)), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer_target(x, "none", None), x)
    with pytest.raises(ValueError):
        layer_target(x, "batch", None)


@pytest.mark.parametrize(
    "cfg", [SPEECH, VISION, ObjectiveConfig(top_k=3, layer_norm="layer", post_norm="instance")], ids=str
)
def test_padding_does_not_change_a_samples_targets(cfg):
    # docs/data2vec.md §7.6: padded frames are excluded from the instance-norm statistics (our choice).
    g = torch.Generator().manual_seed(5)
    T, D, extra = 17, 12, 9
    taps_alone = [torch.randn(1, T, D, generator=g) + 3 for _ in range(cfg.top_k)]
    alone = make_targets(taps_alone, cfg)  # no padding mask at all
    garbage = [torch.randn(1, extra, D, generator=g) * 100 - 50 for _ in range(cfg.top_k)]
    taps_padded = [torch.cat([a, b], dim=1) for a, b in zip(taps_alone, garbage)]
    pad = torch.zeros(1, T + extra, dtype=torch.bool)
    pad[:, T:] = True
    padded = make_targets(taps_padded, cfg, pad)
    torch.testing.assert_close(padded[:, :T], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded).all()


def test_variance_stats_split_and_std():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(57, 10, generator=g) * torch.linspace(0.1, 3, 10) + 2
    stats = variance_stats(x)
    assert stats.dtype == torch.float32 and stats.shape == (21,)
    assert stats[0].item() == 57
    # two "ranks" summing their stats (what an all-reduce does) equals the stats of all rows
    parts = variance_stats(x[:20]) + variance_stats(x[20:].bfloat16().float())
    parts_exact = variance_stats(x[:20]) + variance_stats(x[20:])
    torch.testing.assert_close(parts_exact, stats, atol=1e-4, rtol=1e-6)
    assert abs(std_from_stats(parts_exact) - std_from_stats(stats)) < 1e-5
    assert abs(std_from_stats(parts) - std_from_stats(stats)) < 1e-2
    # fairseq compute_var on one process: sqrt(unbiased var over rows + 1e-6), mean over D
    expected = torch.sqrt(x.double().var(dim=0) + 1e-6).mean().item()
    assert abs(std_from_stats(stats) - expected) < 1e-5
    assert abs(std_from_stats(stats) - x.double().std(dim=0).mean().item()) < 1e-4
    # accepts a bf16 [B, T, D] tensor (rows = all leading dims)
    s3 = variance_stats(x.reshape(3, 19, 10).bfloat16())
    assert s3.dtype == torch.float32 and s3[0].item() == 57
    assert math.isnan(std_from_stats(variance_stats(x[:1])))
