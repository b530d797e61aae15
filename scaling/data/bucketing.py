"""Length-bucketed speech batches: fairseq's ``max_tokens`` batching, inside one look-ahead window.

fairseq (``fairseq/data/audio/raw_audio_dataset.py``) gives every utterance a size of
``min(num_samples, max_sample_size)`` (``num_tokens``/``size``), sorts the whole epoch by it
(``ordered_indices``: ``np.lexsort`` on a random permutation and the sizes, reversed, so longest
first with random ties), and ``fairseq/data/data_utils.py`` ``batch_by_size`` cuts that order
greedily into batches whose *padded* size, ``len(batch) * max(size in batch)``, stays within
``max_tokens`` (and ``len(batch)`` within ``max_sentences`` when set). The epoch iterator then
shuffles the batches, so the model does not see them in length order.

We cannot sort a whole epoch: our stream is read sequentially per (rank, worker) slot, and the
resume cursor must stay small. So the same rule is applied per *window* of the slot's stream
(the loader uses its shuffle window, ``data.shuffle_buffer`` samples): :func:`plan_window` sorts
the window's items longest first (ties by their place in the already shuffled window), cuts them
greedily under the budget, and :func:`batch_order` draws the order in which the window's batches
are emitted from ``(seed, segment, slot, window)``. Both are pure functions of the window, so a
cursor ``(window, next batch)`` resumes exactly.

An item whose size is 0 (a sample known to give no item: a lost position, a bad sample) does not
count against the budget; such items ride in the window's last (shortest) batch, so they are
still read and counted once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plan_window", "batch_order", "padded_size", "TAG_BUCKET_ORDER"]

TAG_BUCKET_ORDER = 0x4255_434B


def padded_size(sizes: Sequence[int]) -> int:
    """What a batch of items of these sizes costs once padded to its longest: ``len x max``."""
    return len(sizes) * max(sizes, default=0)


def plan_window(sizes: Sequence[int], budget: int, max_items: int = 0) -> list[list[int]]:
    """The batches (lists of indices into ``sizes``) of one window.

    Indices are sorted by size, longest first (a stable sort: equal sizes keep their window order),
    and cut greedily: an item joins the current batch while ``(count + 1) x longest <= budget`` and
    ``count < max_items`` (``max_items`` 0: no bound), as fairseq's ``batch_by_size``. Sizes of 0 are
    appended to the last batch (or form one if there is no other). Every index appears exactly once."""
    assert budget > 0 and max_items >= 0, (budget, max_items)
    sized = [i for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]) if sizes[i] > 0]
    empty = [i for i in range(len(sizes)) if sizes[i] <= 0]
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in sized:
        assert sizes[i] <= budget, f"an item of {sizes[i]} samples cannot fit a budget of {budget}"
        longest_with = max(longest, sizes[i])
        if batch and ((len(batch) + 1) * longest_with > budget or (max_items and len(batch) >= max_items)):
            batches.append(batch)
            batch, longest_with = [], sizes[i]
        batch.append(i)
        longest = longest_with
    if batch:
        batches.append(batch)
    if empty:
        if batches:
            batches[-1] = batches[-1] + empty
        else:
            batches.append(empty)
    return batches


def batch_order(seed: int, segment: int, slot: int, num_slots: int, window: int, num_batches: int) -> np.ndarray:
    """The order in which a window's batches are emitted: a permutation drawn from the window's identity."""
    rng = np.random.default_rng([seed, TAG_BUCKET_ORDER, segment + 1, slot, num_slots, window])
    return rng.permutation(num_batches)
