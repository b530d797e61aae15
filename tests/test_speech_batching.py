"""Length-bucketed speech batches (build_loader(max_batch_audio_samples=...)): the window plan against
a direct reading of fairseq's rule, budgets, one read per sample, exact and elastic resume, bad input."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from test_data import assert_batches_equal, loader, make_cfgs, speech_set, take, write_set
from test_loader import SPEECH_DATA, corrupted_speech_shards, load_job_states
from scaling.data.bucketing import batch_order, padded_size, plan_window
from scaling.data.partition import total

BUDGET = 40_000  # padded samples per batch; make_cfgs crops clips to 12,000


def lengths(b) -> list[int]:
    return (~b["audio_padding_BT"]).sum(1).tolist()


def speech_shards(tmp_path, n=23, per_shard=4):
    return write_set(tmp_path, "speech", speech_set(n), per_shard=per_shard)


# ----------------------------------------------------------------------------- the window plan
@pytest.mark.parametrize("max_items", [0, 3])
def test_plan_window_is_fairseqs_greedy_cut_of_the_longest_first_order(max_items):
    rng = np.random.default_rng(0)
    for trial in range(50):
        budget = int(rng.integers(50, 200))
        sizes = [int(v) for v in rng.integers(0, budget + 1, size=int(rng.integers(0, 40)))]
        plan = plan_window(sizes, budget, max_items)
        flat = [i for b in plan for i in b]
        assert sorted(flat) == list(range(len(sizes))), "every item exactly once"
        sized = [b for b in plan if any(sizes[i] for i in b)]
        # the sized items, batch after batch, are the longest-first order with ties in window order
        assert [i for b in sized for i in b if sizes[i]] == sorted((i for i in range(len(sizes)) if sizes[i]),
                                                                  key=lambda i: (-sizes[i], i))
        for k, b in enumerate(sized):
            real = [sizes[i] for i in b if sizes[i]]
            assert len(real) * max(real) <= budget and (not max_items or len(real) <= max_items)
            if k + 1 < len(sized):  # greedy: the next batch's first item did not fit this one
                nxt = sizes[sized[k + 1][0]]
                assert (len(real) + 1) * max(real + [nxt]) > budget or (max_items and len(real) == max_items)
        zeros = [i for i in range(len(sizes)) if not sizes[i]]
        if zeros:  # ride in the last batch, after its sized items
            assert plan[-1][len(plan[-1]) - len(zeros):] == zeros


def test_batch_order_is_a_permutation_of_the_window():
    orders = [batch_order(7, seg, 1, 4, w, 9).tolist() for seg in (-1, 0) for w in (0, 1)]
    assert all(sorted(o) == list(range(9)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4, "windows and segments draw their own orders"
    assert batch_order(7, 0, 1, 4, 0, 9).tolist() == orders[2]


# ----------------------------------------------------------------------------- the loader
def test_one_epoch_reads_each_sample_once_within_budget_and_bound(tmp_path):
    spec = speech_shards(tmp_path)
    d, m, k = make_cfgs("speech", spec, shuffle_buffer=8)
    bucketed = list(loader((d, m, k), mb=3, max_batch_audio_samples=BUDGET, epochs=1))
    fixed = list(loader((d, m, k), mb=2, epochs=1))
    ids = [int(i) for b in bucketed for i in b["sample_id_B"]]
    assert sorted(ids) == sorted(int(i) for b in fixed for i in b["sample_id_B"]) and len(ids) == len(set(ids))
    for b in bucketed:
        assert b["audio_BT"].shape[0] <= 3 and padded_size(lengths(b)) <= BUDGET
        assert b["audio_BT"].shape[1] == max(lengths(b))
    # longest first inside a window, but the batches leave in a shuffled order
    maxima = [max(lengths(b)) for b in bucketed]
    assert maxima != sorted(maxima, reverse=True)
    # the same items as fixed-count batches, bit for bit (per-sample crop and mask)
    rows = {int(i): (b["audio_BT"][r, :n], b["mask_BT"][r]) for b in fixed
            for r, (i, n) in enumerate(zip(b["sample_id_B"], lengths(b)))}
    from scaling.models.speech import conv_output_length

    for b in bucketed:
        for r, (i, n) in enumerate(zip(b["sample_id_B"].tolist(), lengths(b))):
            audio, mask = rows[i]
            frames = conv_output_length(n, m.speech.conv_layers)
            assert torch.equal(b["audio_BT"][r, :n], audio) and torch.equal(b["mask_BT"][r, :frames], mask[:frames])


def test_no_bound_on_utterances_and_less_padding_than_fixed_count(tmp_path):
    spec = speech_shards(tmp_path, n=40, per_shard=10)
    d, m, k = make_cfgs("speech", spec, shuffle_buffer=40)
    d.speech.min_samples = 1000
    bucketed = list(loader((d, m, k), mb=0, max_batch_audio_samples=60_000, epochs=1))
    per_batch = sum(len(lengths(b)) for b in bucketed) / len(bucketed)
    fixed = list(loader((d, m, k), mb=max(1, round(per_batch)), epochs=1))

    def pad_share(batches):
        return 1 - sum(sum(lengths(b)) for b in batches) / sum(padded_size(lengths(b)) for b in batches)

    assert max(len(lengths(b)) for b in bucketed) > 4  # more utterances than any fixed bound would give here
    assert pad_share(bucketed) < 0.5 * pad_share(fixed)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_every_cut_equals_uninterrupted(tmp_path, workers):
    spec = speech_shards(tmp_path)
    d, m, k = make_cfgs("speech", spec, shuffle_buffer=8)
    d.num_workers = workers
    kw = {"mb": 0, "max_batch_audio_samples": BUDGET, "rank": 1, "world_size": 2}
    ref = loader((d, m, k), **kw)
    crossed, inside = False, 0
    for cut in range(12):
        next(ref)
        state = ref.state_dict()
        inside += any(c[2] > 0 for c in state["cursors"])  # inside a window: (segment, window, next batch, mask)
        epoch_before = ref.epoch
        expected = take(ref, 6)
        crossed |= ref.epoch > epoch_before
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        fresh = loader((d, m, k), **kw)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert_batches_equal(take(fresh, 6), expected)
        assert fresh.counters().totals() == ref.counters().totals()
        fresh.close()
        ref.load_state_dict(state)
    ref.close()
    assert crossed and inside >= 4


def test_bad_samples_are_counted_once_as_in_fixed_count_batches(tmp_path):
    spec, expected = corrupted_speech_shards(tmp_path)
    d, m, k = make_cfgs("speech", spec, shuffle_buffer=8)
    d.speech.max_samples, d.max_sample_bytes = 16000, 100000  # as SPEECH_DATA
    assert "data.speech.max_samples=16000" in SPEECH_DATA
    with pytest.warns(UserWarning, match="no index"):
        L = loader((d, m, k), mb=0, max_batch_audio_samples=48_000, epochs=1)
    got = list(L)
    epoch0 = L.counters().totals(epoch=0)
    assert {key: v for key, v in epoch0.items() if v and key != "items"} == expected
    assert sum(len(lengths(b)) for b in got) == expected["good"]


@pytest.mark.parametrize("handed_out", [2, 3])  # both stop some slots inside a window
def test_resume_on_another_layout_reads_every_sample_once(tmp_path, handed_out):
    spec = speech_shards(tmp_path, n=30, per_shard=7)
    d, m, k = make_cfgs("speech", spec, shuffle_buffer=4)
    d.num_workers = 2
    old = [loader((d, m, k), mb=0, max_batch_audio_samples=BUDGET, rank=r, world_size=2) for r in range(2)]
    seen = Counter()
    for L in old:
        for _ in range(handed_out):
            b = next(L)
            seen.update((L.epoch, i) for i in b["sample_id_B"].tolist())
    states = [L.state_dict() for L in old]
    for L in old:
        L.close()
    assert any(c[2] > 0 for s in states for c in s["cursors"]), "some slot should stop inside a window"
    kept = {i for b in loader((d, m, k), mb=1, epochs=1) for i in b["sample_id_B"].tolist()}

    # another world size (fixed-count batches), and the same layout with another budget
    for new_world, budget in ((3, 0), (1, 0), (2, 30_000)):
        d.num_workers = 2 if budget else 0
        new = [loader((d, m, k), mb=0 if budget else 1, max_batch_audio_samples=budget, rank=r, world_size=new_world)
               for r in range(new_world)]
        assert not new[0].same_layout(states[0])
        load_job_states(new, states)
        after = new[0].source.after_catchup
        got = Counter()
        for L in new:
            # workers hand out batches in turn, so one may be in epoch `after` while the other still
            # catches up: twice the catch-up's samples in batches cover every worker's part of it
            for _ in range(2 * total(L.source.catchup) + 2):
                b = next(L)
                if L.epoch < after:
                    got.update((L.epoch, i) for i in b["sample_id_B"].tolist())
            L.close()
        counted = seen + got
        assert max(counted.values()) == 1, "a sample was read twice"
        for e in range(after):
            assert {i for (ee, i) in counted if ee == e} == kept, f"epoch {e}: a sample was skipped"
        assert new[0].counters().totals()["good"] >= sum(seen.values())


def test_errors_name_the_keys(tmp_path):
    with pytest.raises(ValueError, match="max_batch_audio_samples 11999 .*< data.speech.max_samples 12000"):
        loader(make_cfgs("speech"), mb=0, max_batch_audio_samples=11_999)
    with pytest.raises(ValueError, match="speech.*model.modality is 'text'"):
        loader(make_cfgs("text"), mb=2, max_batch_audio_samples=BUDGET)
    with pytest.raises(ValueError, match="micro_batch_size must be positive"):
        loader(make_cfgs("speech"), mb=0)
    # a bucketed state does not resume fixed-count batches exactly, nor the other way round
    st = loader(make_cfgs("speech"), mb=0, max_batch_audio_samples=BUDGET).state_dict()
    with pytest.raises(ValueError, match="batching"):
        loader(make_cfgs("speech"), mb=2).load_state_dict(st)
