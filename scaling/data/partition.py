"""Which samples each (rank, worker) *slot* reads: per epoch, and after a resume on another layout.

Positions. Epoch ``e`` reads the shards in the order ``shard_order(seed, e)``; concatenated, their
samples form the epoch's sequence of ``N`` positions (counts from the shard-set index). An
*interval* ``(epoch, start, stop)`` is a run of positions of one epoch's sequence.

Slots. A job has ``world_size x max(1, num_workers)`` slots; slot ``rank * workers + worker``.
Every epoch, slot ``s`` of ``S`` reads the contiguous run of positions ``[s*N//S, (s+1)*N//S)``:
every sample is read exactly once per epoch across the job, slots differ by at most one sample,
and a shard is split between at most two neighbouring slots. A manifest of sample counts gives
exact epochs (as in mosaicml/streaming, ``docs/source/distributed_training/elastic_determinism.md``);
webdataset's whole-shard ``split_by_node`` / ``split_by_worker`` would give uneven shard sets unequal
sample counts per rank, which hangs collectives (webdataset/webdataset#225).

Layout change. :func:`leftover` turns the cursors of an old layout into one *catch-up* list of
intervals that the new layout splits the same way before it goes on with the next whole epoch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Interval", "shard_order", "split", "pieces", "after", "window", "total", "leftover", "TAG_SHARD_ORDER"]

Interval = tuple[int, int, int]  # (epoch, start, stop)
TAG_SHARD_ORDER = 0x5348_4F52


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The epoch's shard permutation: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch, TAG_SHARD_ORDER]).permutation(num_shards)


def total(intervals: list[Interval]) -> int:
    return sum(stop - start for _, start, stop in intervals)


def split(intervals: list[Interval], parts: int, part: int) -> list[Interval]:
    """Part ``part`` of ``parts`` contiguous, balanced (+-1 position) parts of the intervals' concatenation."""
    assert 0 <= part < parts
    n = total(intervals)
    lo, hi = part * n // parts, (part + 1) * n // parts
    return window(intervals, lo, hi)


def after(intervals: list[Interval], pos: int) -> list[Interval]:
    """The intervals' positions from concatenated position ``pos`` on."""
    return window(intervals, pos, total(intervals))


def window(intervals: list[Interval], lo: int, hi: int) -> list[Interval]:
    """Concatenated positions ``[lo, hi)`` of the intervals."""
    out, base = [], 0
    for epoch, start, stop in intervals:
        a, b = max(lo - base, 0), min(hi - base, stop - start)
        if a < b:
            out.append((epoch, start + a, start + b))
        base += stop - start
    return out


def pieces(start: int, stop: int, order: np.ndarray, counts: list[int]) -> list[tuple[int, int, int]]:
    """Positions ``[start, stop)`` of an epoch whose shard order is ``order``, as
    ``(shard index, first sample, end sample)`` runs inside single shards."""
    out, base = [], 0
    for shard in order:
        n = counts[shard]
        a, b = max(start - base, 0), min(stop - base, n)
        if a < b:
            out.append((int(shard), a, b))
        base += n
        if base >= stop:
            break
    return out


def leftover(old_slots: list[dict], num_samples: int) -> tuple[list[Interval], int]:
    """What an old layout had not yet read: ``(catch-up intervals, first epoch after them)``.

    ``old_slots``: one dict per slot of the old layout: ``slot``, ``num_slots``, ``unread`` (the
    intervals of its current segment it has not handed out) and ``next_epoch`` (the epoch its next
    segment reads). Slots ahead of others are not rewound: the catch-up list holds every slot's
    unread rest plus its whole share of each epoch up to the furthest slot's."""
    last = max(o["next_epoch"] for o in old_slots)
    catchup: list[Interval] = []
    for o in old_slots:
        catchup += o["unread"]
        for epoch in range(o["next_epoch"], last):
            catchup += split([(epoch, 0, num_samples)], o["num_slots"], o["slot"])
    return catchup, last
