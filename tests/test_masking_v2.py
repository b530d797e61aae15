"""data2vec 2.0 masks (scaling.masking): exact counts, structure, determinism, upstream centring, errors."""

from __future__ import annotations

import numpy as np
import pytest

from scaling.masking import block_mask_1d, inverse_block_mask_2d, random_mask, sample_rng

VIT_B = (14, 14)


class _FixedCentres:
    """A stand-in rng: ``integers`` returns the given centres, any other draw is an error, so the
    mask is exactly the union of the (clamped) blocks when no count fix is needed."""

    def __init__(self, centres):
        self.centres = np.asarray(centres, dtype=np.int64)

    def integers(self, low, high, size):
        assert (low, size) == (0, self.centres.shape[0]) and np.all(self.centres < high)
        return self.centres

    def choice(self, *args, **kwargs):
        raise AssertionError("count fix should not have been needed")


def _runs(row: np.ndarray) -> list[int]:
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(np.flatnonzero(d == -1) - np.flatnonzero(d == 1))


def _frac_with_kept_neighbour(kept: np.ndarray, hw) -> float:
    g = kept.reshape(hw)
    nb = np.zeros_like(g)
    nb[1:] |= g[:-1]
    nb[:-1] |= g[1:]
    nb[:, 1:] |= g[:, :-1]
    nb[:, :-1] |= g[:, 1:]
    return float((g & nb).sum() / g.sum())


# ----------------------------------------------------------------------------- 2-D inverse block
@pytest.mark.parametrize("ratio,adjust,masked", [(0.8, 0.07, 157), (0.75, 0.1, 147), (0.6, 0.0, 118)])
def test_inverse_block_2d_exact_count(ratio, adjust, masked):
    for s in range(50):
        m = inverse_block_mask_2d(sample_rng(s), VIT_B, ratio=ratio, adjust=adjust, block=3, num_clones=8)
        assert m.shape == (8, 196) and m.dtype == np.bool_
        assert (m.sum(axis=1) == masked).all()


def test_inverse_block_2d_rectangular_grid_and_even_block():
    for s in range(20):
        m = inverse_block_mask_2d(sample_rng(s), (8, 64), ratio=0.8, adjust=0.05, block=4, num_clones=3)
        assert m.shape == (3, 512)
        assert (m.sum(axis=1) == 512 - int(512 * (1 - 0.8))).all()


def test_inverse_block_2d_ratio_zero_masks_nothing():
    m = inverse_block_mask_2d(sample_rng(0), VIT_B, ratio=0.0, adjust=0.07, block=3, num_clones=4)
    assert not m.any()


def test_inverse_block_2d_upstream_centring_and_clamping():
    # 10x10 grid, block 4: offsets -2..1 (fairseq: range(mask_length) - mask_length // 2), clamped.
    # Centre (0,0) keeps rows/cols {0,1}: 4 patches; centre (9,9) keeps rows/cols {7,8,9}: 9 patches.
    # ratio 0.87 -> keep int(100 * 0.13) = 13 = 4 + 9; adjust 0.2 -> int(100 * 0.33 / 16) = 2 centres.
    m = inverse_block_mask_2d(_FixedCentres([0, 99]), (10, 10), ratio=0.87, adjust=0.2, block=4, num_clones=1)
    kept = ~m[0].reshape(10, 10)
    expected = np.zeros((10, 10), dtype=bool)
    expected[0:2, 0:2] = True
    expected[7:10, 7:10] = True
    np.testing.assert_array_equal(kept, expected)
    # Odd block 3 around an interior centre (4,5) of a 6x8 grid: the 3x3 square rows 3..5, cols 4..6.
    # ratio 0.8125 -> keep int(48 * 0.1875) = 9; adjust 0.2 -> int(48 * 0.3875 / 9) = 2 centres (twice the same).
    m = inverse_block_mask_2d(_FixedCentres([37, 37]), (6, 8), ratio=0.8125, adjust=0.2, block=3, num_clones=1)
    kept = ~m[0].reshape(6, 8)
    expected = np.zeros((6, 8), dtype=bool)
    expected[3:6, 4:7] = True
    np.testing.assert_array_equal(kept, expected)


def test_inverse_block_2d_kept_patches_are_clustered():
    n_keep = int(196 * (1 - 0.8))
    block_stat, rand_stat = [], []
    for s in range(200):
        m = inverse_block_mask_2d(sample_rng(7, s), VIT_B, ratio=0.8, adjust=0.07, block=3, num_clones=1)
        block_stat.append(_frac_with_kept_neighbour(~m[0], VIT_B))
        r = np.zeros(196, dtype=bool)
        r[np.random.default_rng([8, s]).choice(196, n_keep, replace=False)] = True
        rand_stat.append(_frac_with_kept_neighbour(r, VIT_B))
    b, u = np.mean(block_stat), np.mean(rand_stat)
    assert b > u + 0.2, (b, u)
    assert b > 0.85, b


def test_inverse_block_2d_clones_differ_and_seeding():
    kw = dict(ratio=0.8, adjust=0.07, block=3, num_clones=8)
    a = inverse_block_mask_2d(sample_rng(1, 2, 3), VIT_B, **kw)
    assert len({row.tobytes() for row in a}) == 8
    np.testing.assert_array_equal(a, inverse_block_mask_2d(sample_rng(1, 2, 3), VIT_B, **kw))
    assert not np.array_equal(a, inverse_block_mask_2d(sample_rng(1, 2, 4), VIT_B, **kw))


# ----------------------------------------------------------------------------- 1-D block
@pytest.mark.parametrize("ratio,adjust,span,masked", [(0.5, 0.05, 5, 250), (0.55, 0.0, 5, 275), (0.5, 0.1, 1, 250)])
def test_block_1d_exact_count(ratio, adjust, span, masked):
    for s in range(50):
        m = block_mask_1d(sample_rng(s), 500, ratio=ratio, adjust=adjust, span=span, num_clones=8)
        assert m.shape == (8, 500) and m.dtype == np.bool_
        assert (m.sum(axis=1) == masked).all()


def test_block_1d_short_and_empty():
    m = block_mask_1d(sample_rng(0), 7, ratio=0.5, adjust=0.05, span=5, num_clones=2)
    assert (m.sum(axis=1) == 3).all()
    assert block_mask_1d(sample_rng(0), 0, ratio=0.5, adjust=0.05, span=5, num_clones=2).shape == (2, 0)


def test_block_1d_upstream_centring_and_clamping():
    # T=20, span 4: offsets -2..1, clamped. Centre 0 -> {0,1}; centre 19 -> {17,18,19}; centre 10 -> {8..11}.
    # ratio 0.45 -> int(20 * 0.45) = 9 = 2 + 3 + 4; adjust 0.2 -> int(20 * 0.65 / 4) = 3 centres.
    m = block_mask_1d(_FixedCentres([0, 19, 10]), 20, ratio=0.45, adjust=0.2, span=4, num_clones=1)
    np.testing.assert_array_equal(np.flatnonzero(m[0]), [0, 1, 8, 9, 10, 11, 17, 18, 19])


def test_block_1d_masked_frames_come_in_runs():
    block_runs, rand_runs = [], []
    for s in range(100):
        m = block_mask_1d(sample_rng(3, s), 500, ratio=0.5, adjust=0.05, span=5, num_clones=1)
        block_runs += _runs(m[0])
        r = np.zeros(500, dtype=bool)
        r[np.random.default_rng([4, s]).choice(500, 250, replace=False)] = True
        rand_runs += _runs(r)
    b, u = np.mean(block_runs), np.mean(rand_runs)
    assert b > 1.5 * u, (b, u)


def test_block_1d_clones_differ_and_seeding():
    kw = dict(ratio=0.5, adjust=0.05, span=5, num_clones=8)
    a = block_mask_1d(sample_rng(5, 0), 300, **kw)
    assert len({row.tobytes() for row in a}) == 8
    np.testing.assert_array_equal(a, block_mask_1d(sample_rng(5, 0), 300, **kw))
    assert not np.array_equal(a, block_mask_1d(sample_rng(5, 1), 300, **kw))


# ----------------------------------------------------------------------------- random (text)
def _maskable(T=128, n_pad=30):
    m = np.ones(T, dtype=bool)
    m[0] = False  # BOS
    m[T - n_pad - 1] = False  # EOS
    m[T - n_pad :] = False  # padding
    return m


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.48, 0.5, 0.99])
def test_random_mask_exact_count_and_only_maskable(ratio):
    maskable = _maskable()
    n = int(maskable.sum())
    for s in range(30):
        m = random_mask(sample_rng(s), maskable, ratio=ratio, num_clones=6)
        assert m.shape == (6, 128) and m.dtype == np.bool_
        assert (m.sum(axis=1) == int(n * ratio)).all()
        assert not (m & ~maskable).any()


def test_random_mask_is_uniform_over_maskable():
    maskable = _maskable(T=40, n_pad=10)
    n = int(maskable.sum())
    counts = np.zeros(40)
    draws = 2000
    for s in range(draws):
        counts += random_mask(sample_rng(9, s), maskable, ratio=0.5, num_clones=1)[0]
    p = counts[maskable] / draws
    expected = int(n * 0.5) / n
    assert np.abs(p - expected).max() < 0.06, (p.min(), p.max(), expected)


def test_random_mask_no_maskable_positions():
    m = random_mask(sample_rng(0), np.zeros(10, dtype=bool), ratio=0.5, num_clones=3)
    assert m.shape == (3, 10) and not m.any()


def test_random_mask_clones_differ_and_seeding():
    maskable = _maskable()
    a = random_mask(sample_rng(2, 7), maskable, ratio=0.48, num_clones=8)
    assert len({row.tobytes() for row in a}) == 8
    np.testing.assert_array_equal(a, random_mask(sample_rng(2, 7), maskable, ratio=0.48, num_clones=8))
    assert not np.array_equal(a, random_mask(sample_rng(2, 8), maskable, ratio=0.48, num_clones=8))


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    "call,name",
    [
        (lambda r: inverse_block_mask_2d(r, VIT_B, ratio=1.0, adjust=0.07, block=3, num_clones=1), "ratio"),
        (lambda r: inverse_block_mask_2d(r, VIT_B, ratio=-0.1, adjust=0.07, block=3, num_clones=1), "ratio"),
        (lambda r: inverse_block_mask_2d(r, VIT_B, ratio=float("nan"), adjust=0.0, block=3, num_clones=1), "ratio"),
        (lambda r: inverse_block_mask_2d(r, VIT_B, ratio=0.8, adjust=0.07, block=0, num_clones=1), "block"),
        (lambda r: inverse_block_mask_2d(r, VIT_B, ratio=0.8, adjust=0.07, block=3, num_clones=0), "num_clones"),
        (lambda r: inverse_block_mask_2d(r, (0, 14), ratio=0.8, adjust=0.07, block=3, num_clones=1), "grid_hw"),
        (lambda r: block_mask_1d(r, 100, ratio=1.2, adjust=0.05, span=5, num_clones=1), "ratio"),
        (lambda r: block_mask_1d(r, 100, ratio=0.5, adjust=0.05, span=0, num_clones=1), "span"),
        (lambda r: block_mask_1d(r, 100, ratio=0.5, adjust=0.05, span=5, num_clones=0), "num_clones"),
        (lambda r: block_mask_1d(r, -1, ratio=0.5, adjust=0.05, span=5, num_clones=1), "num_frames"),
        (lambda r: random_mask(r, np.ones(10, bool), ratio=1.0, num_clones=1), "ratio"),
        (lambda r: random_mask(r, np.ones(10, bool), ratio=0.5, num_clones=0), "num_clones"),
        (lambda r: random_mask(r, np.ones((2, 5), bool), ratio=0.5, num_clones=1), "maskable"),
    ],
)
def test_argument_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call(sample_rng(0))
