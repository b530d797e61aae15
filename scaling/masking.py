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

__all__ = [
    "sample_rng",
    "speech_span_mask",
    "vision_block_mask",
    "text_span_mask",
    "inverse_block_mask_2d",
    "block_mask_1d",
    "random_mask",
]


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


# ============================================================================= data2vec 2.0
# The v2 recipes make ``clone_batch`` masks per sample (the teacher runs once, the student once
# per clone). Here one call makes all ``num_clones`` masks of ONE sample, drawn one clone after
# the other from the sample's own ``rng`` (see :func:`sample_rng`), so a sample's masks do not
# depend on the other samples of its batch. Upstream draws from torch's global generator.


def _check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not (0.0 <= r < 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return r


def _check_int_ge1(name: str, value: int) -> int:
    v = int(value)
    if v != value or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return v


def _check_adjust(adjust: float) -> float:
    a = float(adjust)
    if not math.isfinite(a):
        raise ValueError(f"adjust must be finite, got {adjust}")
    return a


def _fix_count(rng: np.random.Generator, row: np.ndarray, target: int) -> None:
    """fairseq's ``require_same_masks`` step, in place: set ``row`` to exactly ``target`` True entries
    by clearing ``n - target`` random True entries or setting ``target - n`` random False ones,
    chosen uniformly without replacement (``torch.multinomial(m, k, replacement=False)`` over a
    0/1 row)."""
    n = int(row.sum())
    if n > target:
        row[rng.choice(np.flatnonzero(row), n - target, replace=False)] = False
    elif n < target:
        row[rng.choice(np.flatnonzero(~row), target - n, replace=False)] = True


def inverse_block_mask_2d(
    rng: np.random.Generator,
    grid_hw: tuple[int, int],
    *,
    ratio: float,
    adjust: float,
    block: int,
    num_clones: int,
) -> np.ndarray:
    """data2vec 2.0 image masks of one sample: bool ``[num_clones, H*W]``, row-major, True = masked.

    fairseq ``compute_block_mask_2d`` (fairseq/data/data_utils.py) as called by
    examples/data2vec/data/mae_image_dataset.py and examples/data2vec/models/modalities/images.py
    with ``inverse_mask=True, require_same_masks=True, mask_dropout=0`` (``expand_adjcent`` and
    ``non_overlapping`` off, their defaults). Per clone:

    1. The blocks mark the patches to KEEP: ``keep = 1 - ratio``; draw
       ``int(L * ((keep + adjust) / block**2))`` centres uniformly WITH replacement from
       ``range(L)``, ``L = H*W`` (``torch.randint``; a repeated centre adds nothing).
    2. Each centre ``(r, c)`` marks rows ``r + k`` and columns ``c + k`` for
       ``k in range(block) - block // 2`` (``-1..1`` for block 3; ``-2..1`` for block 4), clamped to
       the grid, as upstream's ``clamp_(0, d - 1)`` (clamping an out-of-grid offset lands on a patch
       the square already covers, so this equals clipping the square).
    3. ``require_same_masks``: remove (or add) kept patches chosen uniformly at random until exactly
       ``int(L * keep)`` are kept, then invert: ``mask = not kept``.

    So every clone masks exactly ``L - int(L * (1 - ratio))`` patches: 157 of 196 for ViT-B at
    ratio 0.8, adjust 0.07, block 3 (39 kept, from 5 centres covering at most 45).

    Differences from upstream: upstream derives a square side ``d = int(L**0.5)`` from ``L``; here
    the grid is ``grid_hw`` and may be rectangular (identical for square grids). Upstream asserts
    ``mask_length > 1``; ``block = 1`` is accepted here (uniform random kept set). A negative
    ``adjust`` giving a negative centre count draws no centres.
    """
    ratio = _check_ratio(ratio)
    adjust = _check_adjust(adjust)
    block = _check_int_ge1("block", block)
    num_clones = _check_int_ge1("num_clones", num_clones)
    H, W = _check_int_ge1("grid_hw[0]", grid_hw[0]), _check_int_ge1("grid_hw[1]", grid_hw[1])
    L = H * W

    keep_prob = 1.0 - ratio  # upstream: mask_prob = 1 - mask_prob under inverse_mask
    num_centres = max(0, int(L * ((keep_prob + adjust) / block**2)))
    target_keep = int(L * keep_prob)
    offsets = np.arange(block) - block // 2

    masks = np.empty((num_clones, L), dtype=bool)
    for i in range(num_clones):
        kept = np.zeros((H, W), dtype=bool)
        centres = rng.integers(0, L, size=num_centres)
        rows, cols = np.divmod(centres, W)
        rr = np.clip(rows[:, None, None] + offsets[None, :, None], 0, H - 1)
        cc = np.clip(cols[:, None, None] + offsets[None, None, :], 0, W - 1)
        kept[rr, cc] = True
        kept = kept.reshape(-1)
        _fix_count(rng, kept, target_keep)
        masks[i] = ~kept
    return masks


def block_mask_1d(
    rng: np.random.Generator,
    num_frames: int,
    *,
    ratio: float,
    adjust: float,
    span: int,
    num_clones: int,
) -> np.ndarray:
    """data2vec 2.0 speech masks of one sample: bool ``[num_clones, T]``, True = masked.

    fairseq ``compute_block_mask_1d`` (fairseq/data/data_utils.py) as called by
    fairseq/data/audio/raw_audio_dataset.py (and examples/data2vec/data/mae_image_dataset.py for
    ``mask_length == 1``) with ``inverse_mask=False, require_same_masks=True, mask_dropout=0``
    (``expand_adjcent``, ``non_overlapping`` off). Per clone: draw ``int(T * ((ratio + adjust) /
    span))`` centres uniformly WITH replacement from ``range(T)``; each masks frames ``c + k`` for
    ``k in range(span) - span // 2``, clamped to ``[0, T-1]``; then unmask (or mask) frames chosen
    uniformly at random until exactly ``int(T * ratio)`` are masked.

    ``num_frames`` is the sample's real frame count (after the feature extractor, padding
    excluded, as upstream computes it per sample); the caller pads with False.
    """
    ratio = _check_ratio(ratio)
    adjust = _check_adjust(adjust)
    span = _check_int_ge1("span", span)
    num_clones = _check_int_ge1("num_clones", num_clones)
    T = int(num_frames)
    if T != num_frames or T < 0:
        raise ValueError(f"num_frames must be a non-negative integer, got {num_frames}")
    masks = np.zeros((num_clones, T), dtype=bool)
    if T == 0:
        return masks

    num_centres = max(0, int(T * ((ratio + adjust) / span)))
    target = int(T * ratio)
    offsets = np.arange(span) - span // 2
    for i in range(num_clones):
        row = masks[i]
        centres = rng.integers(0, T, size=num_centres)
        idx = np.clip(centres[:, None] + offsets[None, :], 0, T - 1)
        row[idx.reshape(-1)] = True
        _fix_count(rng, row, target)
    return masks


def random_mask(
    rng: np.random.Generator,
    maskable: np.ndarray,
    *,
    ratio: float,
    num_clones: int,
) -> np.ndarray:
    """data2vec 2.0 text masks of one sample: bool ``[num_clones, T]``, True = masked.

    MAE-style ``random_masking`` (examples/data2vec/models/modalities/base.py), used by the v2
    modality encoders when ``mask_length == 1`` (the text recipe): per clone a uniformly random
    subset of positions, of a fixed size, is masked, drawn without replacement (upstream: argsort
    of uniform noise).

    Here only the ``n = maskable.sum()`` maskable positions are candidates (``maskable`` is False at
    BOS/EOS/padding) and exactly ``int(n * ratio)`` of them are masked per clone; non-maskable
    positions are never masked. Upstream instead draws over all ``L`` positions of the padded row
    and masks ``L - int(L * (1 - ratio))`` of them (it keeps ``int(L * (1 - ratio))``); the two counts
    differ by one when ``L * ratio`` is not an integer (e.g. L=512, ratio 0.48: upstream 246, here 245).
    """
    ratio = _check_ratio(ratio)
    num_clones = _check_int_ge1("num_clones", num_clones)
    maskable = np.asarray(maskable)
    if maskable.ndim != 1:
        raise ValueError(f"maskable must be 1-D, got shape {maskable.shape}")
    maskable = maskable.astype(bool)
    T = maskable.shape[0]
    candidates = np.flatnonzero(maskable)
    n = candidates.shape[0]
    k = int(n * ratio)
    masks = np.zeros((num_clones, T), dtype=bool)
    for i in range(num_clones):
        if k > 0:
            masks[i, rng.choice(candidates, k, replace=False)] = True
    return masks
