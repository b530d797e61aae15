"""Per-sample masks for data2vec v1: speech spans, vision blocks, text spans.

Every function draws from an explicit ``numpy.random.Generator`` and makes the mask of ONE
sample. Seed that generator with :func:`sample_rng` from keys that identify the sample
(e.g. ``(seed, epoch, sample_id)``), never from a batch- or rank-level stream: a sample's mask
then depends only on its own keys, not on which other samples share its micro-batch, its rank
or its position in the global batch. A run therefore gives the same masks however the global
batch is split across micro-batches and ranks, and a resumed run gives the same masks as an
uninterrupted one.

Sources (docs/data2vec.md §3.2-§3.4): fairseq ``compute_mask_indices`` (speech), BEiT
``MaskingGenerator`` as used by data2vec_vision (vision), fairseq ``MaskTokensDataset`` with
``mask_multiple_length`` (text, released ``text/pretraining/base.yaml``).
"""

from __future__ import annotations

import math

import numpy as np

from scaling.config import SpeechMaskConfig, TextMaskConfig, VisionMaskConfig

__all__ = ["sample_rng", "speech_span_mask", "vision_block_mask", "text_span_mask"]


def sample_rng(*keys: int) -> np.random.Generator:
    """A generator seeded by the non-negative integer ``keys``, e.g. ``(seed, epoch, sample_id)``.

    ``default_rng([k0, k1, ...])`` hashes the whole key list through ``SeedSequence``, so nearby
    keys give independent streams and ``(1, 23)`` differs from ``(12, 3)``.
    """
    if not keys:
        raise ValueError("sample_rng needs at least one key")
    ks = [int(k) for k in keys]
    if any(k < 0 for k in ks):
        raise ValueError(f"sample_rng keys must be non-negative, got {keys}")
    return np.random.default_rng(ks)


# ----------------------------------------------------------------------------- speech
def speech_span_mask(rng: np.random.Generator, num_frames: int, cfg: SpeechMaskConfig) -> np.ndarray:
    """fairseq ``compute_mask_indices`` for one row: "static" span lengths, overlaps allowed.

    docs/data2vec.md §3.2, §7.4 (data2vec paper §4.2): ``cfg.prob`` (0.65) is the start
    probability per frame (0.065) times the span length (10), so the number of span starts is
    ``max(min_masks, int(prob * T / length + U[0,1)))``. Starts are drawn without replacement
    from ``range(T - length)`` and each masks ``length`` frames (clipped to T). Because spans
    overlap, about 49% of a long utterance ends up masked, not 65%.

    ``num_frames`` is the sample's REAL frame count (padding excluded), as fairseq does when it
    is given a padding mask; the caller pads the returned mask with False.

    Deliberately NOT ported: ``require_same_masks`` (fairseq then trims every row of the batch
    to the batch's smallest masked count). That couples a sample's mask to the other samples in
    its batch, and it is not needed here: the loss is normalised by the real global masked
    count, so rows need not have equal numbers of masked frames.
    """
    T = int(num_frames)
    mask = np.zeros(max(T, 0), dtype=bool)
    if T <= 0:
        return mask
    length = int(cfg.length)
    if length < 1:
        raise ValueError(f"speech mask length must be >= 1, got {length}")
    num_mask = max(int(cfg.min_masks), int(cfg.prob * T / float(length) + rng.random()))
    if num_mask <= 0:
        return mask
    # fairseq's guard for short sequences: leave room for num_mask distinct starts.
    min_len = length
    if T - min_len <= num_mask:
        min_len = T - num_mask - 1
    starts = rng.choice(T - min_len, num_mask, replace=False)
    idx = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
    mask[idx[idx < T]] = True
    return mask


# ----------------------------------------------------------------------------- vision
def vision_block_mask(rng: np.random.Generator, grid_hw: tuple[int, int], cfg: VisionMaskConfig) -> np.ndarray:
    """BEiT block-wise masking (``MaskingGenerator``, docs/data2vec.md §3.3); bool ``[H*W]``, row-major.

    Target ``round(ratio * H * W)`` patches (120 of 196 for ViT-B). Each round tries up to 10
    rectangles with area ~ U[min_block_patches, max_patches] and a log-uniform aspect ratio in
    [min_aspect, 1/min_aspect]; a rectangle is accepted when it fits strictly inside the grid
    (h < H, w < W, as BEiT) and adds between 1 and ``max_patches`` new patches, where
    ``max_patches = min(remaining budget, max_block_patches)`` (0: no limit beyond the budget).
    Rounds continue until the target is reached or a round adds nothing, so the count never
    exceeds the target (it can fall short, rarely, when only small remainders are left).
    """
    H, W = int(grid_hw[0]), int(grid_hw[1])
    grid = np.zeros((H, W), dtype=bool)
    target = int(round(cfg.ratio * H * W))
    target = min(max(target, 0), H * W)
    min_aspect = float(cfg.min_aspect)
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"vision min_aspect must be in (0, 1], got {min_aspect}")
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    block_cap = int(cfg.max_block_patches) if cfg.max_block_patches > 0 else H * W
    min_area = float(cfg.min_block_patches)

    count = 0
    while count < target:
        max_patches = min(target - count, block_cap)
        delta = 0
        for _ in range(10):
            # BEiT uses random.uniform(min, max), which also accepts min > max (small remainders).
            lo, hi = sorted((min_area, float(max_patches)))
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < W and h < H:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                block = grid[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block[...] = True
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return grid.reshape(-1)


# ----------------------------------------------------------------------------- text
def text_span_mask(
    rng: np.random.Generator,
    tokens: np.ndarray,
    cfg: TextMaskConfig,
    *,
    maskable: np.ndarray,
    mask_id: int,
    vocab_size: int,
    num_special: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Span masking of the released v1 text recipe; returns ``(mask, input_tokens)`` (docs/data2vec.md
    §3.4, §7.1).

    fairseq ``MaskTokensDataset`` with ``mask_multiple_length``: among the ``n`` maskable positions
    (``maskable`` is False at BOS/EOS/padding), ``int(prob * n / span + U[0,1))`` starts are drawn
    without replacement; each masks ``span`` consecutive positions, and only maskable positions
    are kept. With prob 0.35 and span 4 about 1 - (1 - 0.35/4)^4 = 31% of tokens are selected.

    Input corruption of the selected positions: ``<mask>`` by default; with probability
    ``leave_unmasked_prob`` the original token, with probability ``random_token_prob`` a uniform
    random id in ``[num_special, vocab_size)`` (BERT 80/10/10 at 0.1/0.1), drawn as fairseq does.

    ``mask`` marks EVERY selected position, including those left unchanged or randomised, and
    the loss is taken at all of them (BERT's choice). fairseq v1 instead scores only positions
    whose input equals ``<mask>`` (issue fairseq#4229, docs/data2vec.md §6.2); under the released
    recipe (0 unchanged, 0 random) the two are identical. The teacher must get the original
    ``tokens``, not ``input_tokens`` (fairseq#4881, docs/data2vec.md §6.1).
    """
    tokens = np.asarray(tokens)
    maskable = np.asarray(maskable, dtype=bool)
    if tokens.shape != maskable.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and maskable {maskable.shape} must be equal 1-D shapes")
    T = tokens.shape[0]
    span = int(cfg.span)
    if span < 1:
        raise ValueError(f"text mask span must be >= 1, got {span}")
    mask = np.zeros(T, dtype=bool)
    inputs = tokens.astype(np.int64, copy=True)

    candidates = np.flatnonzero(maskable)
    n = candidates.shape[0]
    if n == 0:
        return mask, inputs
    num_mask = min(n, int(cfg.prob * n / float(span) + rng.random()))
    if num_mask > 0:
        starts = rng.choice(candidates, num_mask, replace=False)
        idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
        mask[idx[idx < T]] = True
        mask &= maskable

    # BERT-style corruption, in fairseq's order of draws (one U per position, then a decision).
    p_keep, p_rand = float(cfg.leave_unmasked_prob), float(cfg.random_token_prob)
    keep = np.zeros(T, dtype=bool)
    rand = np.zeros(T, dtype=bool)
    p_either = p_keep + p_rand
    if p_either > 0.0:
        either = mask & (rng.random(T) < p_either)
        if p_rand == 0.0:
            keep = either
        elif p_keep == 0.0:
            rand = either
        else:
            decision = rng.random(T) < p_keep / p_either
            keep = either & decision
            rand = either & ~decision
    inputs[mask & ~keep & ~rand] = int(mask_id)
    num_rand = int(rand.sum())
    if num_rand > 0:
        if not 0 <= num_special < vocab_size:
            raise ValueError(f"need 0 <= num_special ({num_special}) < vocab_size ({vocab_size})")
        inputs[rand] = rng.integers(num_special, vocab_size, size=num_rand, dtype=np.int64)
    return mask, inputs
