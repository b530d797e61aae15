"""Masking (docs/data2vec.md §3.2-§3.4): statistics against independent formulas, structure, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaling.config import SpeechMaskConfig, TextMaskConfig, VisionMaskConfig
from scaling.masking import sample_rng, speech_span_mask, text_span_mask, vision_block_mask


def _expected_fraction_overlapping_spans(T: int, num_positions: int, span: int, k_values, k_probs) -> float:
    """Exact E[masked fraction] when k distinct starts are drawn uniformly from range(num_positions)
    and each covers `span` frames (clipped to T); k is random with the given distribution.

    Frame i is unmasked iff none of the c_i starts that cover it is drawn: a hypergeometric zero,
    P = prod_{j<k} (N - c_i - j) / (N - j).
    """
    N = num_positions
    total = 0.0
    for k, pk in zip(k_values, k_probs):
        frac = 0.0
        for i in range(T):
            c = max(0, min(i, N - 1) - max(0, i - span + 1) + 1)
            p_free = 1.0
            for j in range(k):
                p_free *= max(0.0, (N - c - j) / (N - j))
            frac += 1.0 - p_free
        total += pk * frac / T
    return total


def _rounding_distribution(x: float):
    """int(x + U[0,1)) is floor(x) + 1 with probability frac(x), else floor(x)."""
    f = math.floor(x)
    return [f, f + 1], [1.0 - (x - f), x - f]


def _runs(mask: np.ndarray):
    """(start, length) of every maximal run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return list(zip(starts, ends - starts))


# ----------------------------------------------------------------------------- speech
def test_speech_masked_fraction_matches_overlapping_span_expectation():
    cfg = SpeechMaskConfig(prob=0.65, length=10, min_masks=1)
    T, n = 500, 1500
    fracs = np.array([speech_span_mask(sample_rng(7, s), T, cfg).mean() for s in range(n)])
    ks, ps = _rounding_distribution(cfg.prob * T / cfg.length)
    expected = _expected_fraction_overlapping_spans(T, T - cfg.length, cfg.length, ks, ps)
    # standard error of the mean is ~0.0006 here
    assert abs(fracs.mean() - expected) < 0.004, (fracs.mean(), expected)
    # docs/data2vec.md §3.2 (paper §4.2): start probability 0.065 x span 10 masks about 49% of frames
    assert abs(expected - 0.49) < 0.02
    assert abs(fracs.mean() - 0.49) < 0.02


def test_speech_number_of_starts_follows_formula():
    # With span length 1 every start masks exactly one distinct frame: masked count == number of starts.
    cfg = SpeechMaskConfig(prob=0.137, length=1, min_masks=1)
    T = 500
    x = cfg.prob * T / cfg.length  # 68.5
    counts = np.array([speech_span_mask(sample_rng(3, s), T, cfg).sum() for s in range(2000)])
    assert set(np.unique(counts)) <= {math.floor(x), math.floor(x) + 1}
    assert abs(counts.mean() - x) < 0.05  # mean of int(x + U) is x; sd of the mean ~0.011


def test_speech_min_masks_and_short_sequences():
    cfg = SpeechMaskConfig(prob=0.65, length=10, min_masks=1)
    for T in (1, 3, 9, 10, 11, 15):
        for s in range(50):
            m = speech_span_mask(sample_rng(1, T, s), T, cfg)
            assert m.shape == (T,) and m.dtype == bool
    # a sequence much longer than the span always gets at least min_masks spans
    cfg2 = SpeechMaskConfig(prob=0.0, length=10, min_masks=2)
    for s in range(50):
        assert speech_span_mask(sample_rng(2, s), 200, cfg2).sum() >= 10
    assert speech_span_mask(sample_rng(0), 0, cfg).shape == (0,)


def test_speech_runs_at_least_span_length_unless_at_end():
    cfg = SpeechMaskConfig(prob=0.65, length=10, min_masks=1)
    for T in (37, 120, 500):
        for s in range(200):
            m = speech_span_mask(sample_rng(11, T, s), T, cfg)
            assert m.any()
            for start, length in _runs(m):
                assert length >= cfg.length or start + length == T, (T, s, start, length)


def test_speech_deterministic_per_sample_seed():
    cfg = SpeechMaskConfig()
    a = speech_span_mask(sample_rng(0, 1, 42), 400, cfg)
    b = speech_span_mask(sample_rng(0, 1, 42), 400, cfg)
    c = speech_span_mask(sample_rng(0, 1, 43), 400, cfg)
    d = speech_span_mask(sample_rng(0, 2, 42), 400, cfg)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_sample_rng_rejects_negative_and_empty_keys():
    with pytest.raises(ValueError):
        sample_rng(-1)
    with pytest.raises(ValueError):
        sample_rng()
    assert sample_rng(1, 23).random() != sample_rng(12, 3).random()


# ----------------------------------------------------------------------------- vision
def _masked_neighbour(grid: np.ndarray) -> np.ndarray:
    p = np.pad(grid, 1)
    return p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def test_vision_count_hits_target_and_never_exceeds():
    cfg = VisionMaskConfig()  # 120 of 196, blocks >= 16, aspect [0.3, 1/0.3]
    target = round(cfg.ratio * 196)
    assert target == 120
    counts = []
    for s in range(1000):
        m = vision_block_mask(sample_rng(5, s), (14, 14), cfg)
        assert m.shape == (196,) and m.dtype == bool
        counts.append(int(m.sum()))
    counts = np.array(counts)
    assert counts.max() <= target
    # BEiT stops when a round of 10 attempts adds nothing, so it can end a few patches short
    # when only a small remainder is left; it reaches the target in most draws.
    assert (counts == target).mean() > 0.6
    assert counts.mean() > target - 1.0
    assert counts.min() >= target - 16


def test_vision_max_block_cap_equivalent_to_no_cap_when_large():
    # [DV] passes --max_mask_patches_per_block 196; with a 120 target that equals "no limit" (0).
    a = VisionMaskConfig(max_block_patches=0)
    b = VisionMaskConfig(max_block_patches=196)
    for s in range(50):
        assert np.array_equal(
            vision_block_mask(sample_rng(9, s), (14, 14), a), vision_block_mask(sample_rng(9, s), (14, 14), b)
        )


def test_vision_mask_is_made_of_blocks():
    cfg = VisionMaskConfig()
    isolated = total = 0
    for s in range(500):
        g = vision_block_mask(sample_rng(6, s), (14, 14), cfg).reshape(14, 14)
        isolated += int((g & ~_masked_neighbour(g)).sum())
        total += int(g.sum())
    # Blocks have >= 16 patches; only a final top-up smaller than min_block (area ~ U[remainder, 16])
    # can be a lone patch. A uniform random 120/196 mask would have ~2-3% isolated patches.
    assert isolated / total < 1e-3


def _single_rectangle(g: np.ndarray):
    """(h, w) if the masked patches form one filled rectangle, else None."""
    rows, cols = np.flatnonzero(g.any(1)), np.flatnonzero(g.any(0))
    if rows.size == 0:
        return None
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    return (int(h), int(w)) if g.sum() == h * w else None


def test_vision_aspect_and_block_size_limits():
    H = W = 40
    # Target == min block == 16 with square blocks: area is exactly 16 and aspect 1, so every mask
    # is one 4x4 square.
    sq = VisionMaskConfig(ratio=16 / (H * W), min_block_patches=16, max_block_patches=0, min_aspect=1.0)
    for s in range(100):
        g = vision_block_mask(sample_rng(4, s), (H, W), sq).reshape(H, W)
        assert _single_rectangle(g) == (4, 4)

    # Aspect in [0.3, 1/0.3], area 16: the mask is mostly one rectangle whose shape shows the draw.
    cfg = VisionMaskConfig(ratio=16 / (H * W), min_block_patches=16, max_block_patches=0, min_aspect=0.3)
    rects = []
    for s in range(600):
        g = vision_block_mask(sample_rng(8, s), (H, W), cfg).reshape(H, W)
        assert g.sum() <= 16
        r = _single_rectangle(g)
        if r is not None:
            rects.append(r)
    assert len(rects) > 300
    lo, hi = cfg.min_aspect, 1 / cfg.min_aspect
    for h, w in rects:
        # h = round(sqrt(area * a)), w = round(sqrt(area / a)) with a in [0.3, 1/0.3]:
        # the drawn a = sqrt(area*a)/sqrt(area/a) lies in [(h-.5)/(w+.5), (h+.5)/(w-.5)].
        assert (h - 0.5) / (w + 0.5) <= hi + 1e-9, (h, w)
        assert (h + 0.5) / max(w - 0.5, 1e-9) >= lo - 1e-9, (h, w)
    ratios = np.array([h / w for h, w in rects])
    assert ratios.min() < 0.5 and ratios.max() > 2.0  # both tall and wide blocks occur

    # max_block_patches: with min 4, cap 4 and square blocks every block is exactly 2x2 (area
    # U[4, 4], aspect 1), so every masked patch lies in a fully masked 2x2 window, except 1x1
    # top-ups once at most 2 patches remain (area ~ U[remainder, 4] < 2.25); without the cap
    # the first block alone is U[4, 40] patches, and a mask holds a full 4x4 square most of the time.
    def full_windows(g, k):
        c = np.lib.stride_tricks.sliding_window_view(g, (k, k)).all(axis=(-1, -2))
        cover = np.zeros_like(g)
        for i, j in zip(*np.nonzero(c)):
            cover[i : i + k, j : j + k] = True
        return c.any(), cover

    capped = VisionMaskConfig(ratio=40 / (H * W), min_block_patches=4, max_block_patches=4, min_aspect=1.0)
    uncapped = VisionMaskConfig(ratio=40 / (H * W), min_block_patches=4, max_block_patches=0, min_aspect=1.0)
    big_capped = big_uncapped = 0
    for s in range(200):
        g = vision_block_mask(sample_rng(4, s), (H, W), capped).reshape(H, W)
        assert 36 <= g.sum() <= 40  # BEiT may stop a few short
        _, cover = full_windows(g, 2)
        assert not (cover & ~g).any() and (g & ~cover).sum() <= 2
        big_capped += full_windows(g, 4)[0]
        big_uncapped += full_windows(vision_block_mask(sample_rng(4, s), (H, W), uncapped).reshape(H, W), 4)[0]
    assert big_uncapped > 100 and big_capped < big_uncapped / 4


def test_vision_deterministic_and_row_major():
    cfg = VisionMaskConfig()
    a = vision_block_mask(sample_rng(0, 0, 1), (14, 14), cfg)
    assert np.array_equal(a, vision_block_mask(sample_rng(0, 0, 1), (14, 14), cfg))
    assert not np.array_equal(a, vision_block_mask(sample_rng(0, 0, 2), (14, 14), cfg))
    # a non-square grid comes back row-major [H*W]
    m = vision_block_mask(sample_rng(3), (6, 20), VisionMaskConfig(ratio=0.3, min_block_patches=4))
    assert m.shape == (120,)


# ----------------------------------------------------------------------------- text
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
NUM_SPECIAL, VOCAB = 5, 1000


def _text_sample(rng: np.random.Generator, length: int, total: int):
    """BOS + (length-2) ordinary tokens + EOS, right-padded to `total`."""
    tok = np.full(total, PAD, dtype=np.int64)
    tok[0], tok[length - 1] = BOS, EOS
    tok[1 : length - 1] = rng.integers(NUM_SPECIAL, VOCAB, size=length - 2)
    maskable = np.zeros(total, dtype=bool)
    maskable[1 : length - 1] = True
    return tok, maskable


def _text_mask(seed, tok, maskable, cfg):
    return text_span_mask(
        sample_rng(*np.atleast_1d(seed)), tok, cfg, maskable=maskable, mask_id=MASK, vocab_size=VOCAB, num_special=NUM_SPECIAL
    )


def test_text_masked_fraction_and_specials():
    cfg = TextMaskConfig(prob=0.35, span=4)
    data_rng = np.random.default_rng(0)
    fracs = []
    for s in range(400):
        length = 512 if s % 2 == 0 else int(data_rng.integers(300, 512))
        tok, maskable = _text_sample(data_rng, length, 512)
        mask, inp = _text_mask(s, tok, maskable, cfg)
        assert mask.dtype == bool and inp.dtype == np.int64 and inp.shape == tok.shape
        assert not (mask & ~maskable).any(), "BOS/EOS/pad must never be selected"
        assert np.array_equal(inp[~mask], tok[~mask])
        assert (inp[mask] == MASK).all(), "released recipe: every selected token becomes <mask>"
        if length == 512:
            fracs.append(mask[maskable].mean())
    n = 510
    ks, ps = _rounding_distribution(cfg.prob * n / cfg.span)
    # starts are drawn from all n maskable positions; spans running past the last one are cut
    expected = _expected_fraction_overlapping_spans(n, n, cfg.span, ks, ps)
    assert abs(np.mean(fracs) - expected) < 0.006, (np.mean(fracs), expected)
    assert abs(np.mean(fracs) - (1 - (1 - 0.35 / 4) ** 4)) < 0.01  # ~0.31 on long sequences


def test_text_bert_80_10_10():
    cfg = TextMaskConfig(prob=0.35, span=4, leave_unmasked_prob=0.1, random_token_prob=0.1)
    data_rng = np.random.default_rng(1)
    n_mask = n_kept = n_rand = 0
    for s in range(300):
        tok, maskable = _text_sample(data_rng, 256, 256)
        mask, inp = _text_mask(s, tok, maskable, cfg)
        assert not (mask & ~maskable).any()
        assert np.array_equal(inp[~mask], tok[~mask])
        sel_in, sel_tok = inp[mask], tok[mask]
        is_mask = sel_in == MASK
        is_kept = sel_in == sel_tok
        is_rand = ~is_mask & ~is_kept
        assert (sel_in[is_rand] >= NUM_SPECIAL).all() and (sel_in[is_rand] < VOCAB).all()
        n_mask += int(is_mask.sum())
        n_kept += int(is_kept.sum())
        n_rand += int(is_rand.sum())
    total = n_mask + n_kept + n_rand
    assert total > 15000
    # a random id equals the original with prob 1/995: negligible against the 0.015 tolerance
    assert abs(n_mask / total - 0.8) < 0.015
    assert abs(n_kept / total - 0.1) < 0.015
    assert abs(n_rand / total - 0.1) < 0.015


def test_text_random_ids_never_special():
    cfg = TextMaskConfig(prob=0.5, span=2, leave_unmasked_prob=0.0, random_token_prob=1.0)
    data_rng = np.random.default_rng(2)
    for s in range(100):
        tok, maskable = _text_sample(data_rng, 128, 160)
        mask, inp = _text_mask(s, tok, maskable, cfg)
        assert mask.any()
        assert (inp[mask] >= NUM_SPECIAL).all() and (inp[mask] < VOCAB).all()
        assert np.array_equal(inp[~mask], tok[~mask])


def test_text_deterministic_and_degenerate():
    cfg = TextMaskConfig()
    tok, maskable = _text_sample(np.random.default_rng(3), 200, 256)
    m1, i1 = _text_mask((0, 5), tok, maskable, cfg)
    m2, i2 = _text_mask((0, 5), tok, maskable, cfg)
    m3, _ = _text_mask((0, 6), tok, maskable, cfg)
    assert np.array_equal(m1, m2) and np.array_equal(i1, i2)
    assert not np.array_equal(m1, m3)
    # nothing maskable: nothing selected
    m, i = _text_mask(1, tok, np.zeros_like(maskable), cfg)
    assert not m.any() and np.array_equal(i, tok)
