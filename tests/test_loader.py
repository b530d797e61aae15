"""The loader's partition over (rank, worker) slots, exact resume, resume on another layout, and bad input."""

from __future__ import annotations

import io
import math
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from dist_harness import REPO, run_recipe, run_single, spawn
from test_data import assert_batches_equal, loader, make_cfgs, take, text_set, vision_set
from scaling.config import load_recipe
from scaling.data import encode_speech_sample, encode_vision_sample
from scaling.data.partition import leftover, split
from scaling.data.quality import BAD_KINDS, BadDataError, DataCounters
from scaling.data.shards import write_shard_set


def uneven_vision_shards(tmp_path, sizes=(1, 9, 2, 14, 3, 6)):
    """Shards of the given sizes (each its own indexed set); returns (spec, keys)."""
    data = vision_set(sum(sizes))
    paths, keys, i = [], [], 0
    for j, n in enumerate(sizes):
        chunk = data[i : i + n]
        i += n
        index = write_shard_set(str(tmp_path), (encode_vision_sample(k, torch.from_numpy(x), label=lab)
                                                for k, x, lab in chunk), prefix=f"part{j}", samples_per_shard=None)
        paths.append(os.path.join(tmp_path, index["shards"][0]["name"]))
        keys += [k for k, _, _ in chunk]
    return ",".join(paths), keys


def items_with_epochs(L, n):
    """``n`` one-item batches as (epoch, sample id)."""
    out = []
    for _ in range(n):
        b = next(L)
        out.append((L.epoch, int(b["sample_id_B"])))
    return out


# ----------------------------------------------------------------------------- partition
def test_split_is_balanced_and_contiguous():
    parts = [split([(0, 0, 35)], 4, s) for s in range(4)]
    assert [p[0][2] - p[0][1] for p in parts] == [8, 9, 9, 9]
    assert [p[0][1] for p in parts] == [0, 8, 17, 26] and parts[-1][0][2] == 35
    # over several intervals: the concatenation, cut in place
    assert split([(3, 5, 9), (4, 0, 6)], 2, 1) == [(4, 1, 6)]
    assert split([(3, 5, 9), (4, 0, 6)], 2, 0) == [(3, 5, 9), (4, 0, 1)]


def test_leftover_keeps_unread_positions_and_lagging_epochs():
    # 2 old slots over 10 samples: slot 0 has read 3 of epoch 4 (positions 0..4); slot 1 is already
    # 2 into epoch 5 (its part of epoch 4 is 5..9, done). Epoch 4's rest of slot 0, and epoch 5's rest of slot 1.
    old = [{"slot": 0, "num_slots": 2, "unread": [(4, 3, 5)], "next_epoch": 5},
           {"slot": 1, "num_slots": 2, "unread": [(5, 7, 10)], "next_epoch": 6}]
    catchup, after = leftover(old, 10)
    assert after == 6
    # slot 0 still owes its share of epoch 5 (positions 0..4) too
    assert catchup == [(4, 3, 5), (5, 0, 5), (5, 7, 10)]


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(tmp_path):
    spec, keys = uneven_vision_shards(tmp_path)
    d, m, k = make_cfgs("vision", spec, shuffle_buffer=4)
    d.num_workers = 2
    per_rank = []
    for rank in range(2):
        got = items_with_epochs(loader((d, m, k), mb=1, rank=rank, world_size=2), 24)  # > an epoch's share
        per_rank.append([sid for e, sid in got if e == 0])
    epoch0 = per_rank[0] + per_rank[1]
    assert len(epoch0) == len(keys) == len(set(epoch0))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1  # 35 samples: 17 and 18


def test_finite_pass_with_workers_reads_every_sample_once(tmp_path):
    spec, keys = uneven_vision_shards(tmp_path)
    d, m, k = make_cfgs("vision", spec, shuffle_buffer=4)
    d.num_workers = 2
    from scaling.data import build_loader

    L = build_loader(d, m, k, seed=0, rank=0, world_size=1, micro_batch_size=4, epochs=1)
    ids = [int(i) for b in L for i in b["sample_id_B"]]
    assert len(ids) == len(keys) == len(set(ids))


def test_too_few_samples_for_the_slots_is_an_error(tmp_path):
    spec, _ = uneven_vision_shards(tmp_path, sizes=(2, 1))
    d, m, k = make_cfgs("vision", spec)
    d.num_workers = 2
    with pytest.raises(ValueError, match="3 samples per epoch.*4 slots"):
        loader((d, m, k), world_size=2)


def _uneven_ranks(modality, spec, steps, ckpt):
    result = run_recipe(modality, [f"data.train_shards={spec}", "engine.name=ddp", f"train.max_steps={steps}",
                                   "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32",
                                   "tracking.enabled=false", "checkpoint.resume=never", "model.vision.image_size=16",
                                   "model.vision.patch_size=4", "masking.vision.min_block_patches=2",
                                   f"checkpoint.dir={ckpt}"])
    return result["step"], result["losses"]


def test_uneven_shards_do_not_hang_two_ranks(tmp_path):
    # 35 samples: ranks get 17 and 18 per epoch; 12 steps of 2 per rank cross an epoch boundary
    # at different steps on the two ranks, and every step's all-reduce still meets.
    spec, _ = uneven_vision_shards(tmp_path)
    ranks = spawn(_uneven_ranks, "vision", spec, 12, str(tmp_path / "ckpt"))
    assert [r[0] for r in ranks] == [12, 12]
    assert ranks[0][1] == ranks[1][1]


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("workers", [0, 2])
def test_next_8_batches_after_resume_equal_uninterrupted(tmp_path, workers):
    from scaling.data import write_shards
    from scaling.data.shards import encode_text_sample

    # documents of 1..59 tokens in blocks of 22: cursors fall inside multi-block documents
    spec = write_shards(str(tmp_path), (encode_text_sample(k, ids) for k, ids in text_set(13)), samples_per_shard=3)
    d, m, k = make_cfgs("text", spec, shuffle_buffer=4)
    d.num_workers = workers
    ref = loader((d, m, k), mb=2, rank=1, world_size=2)
    crossed = False
    for cut in range(1, 12):
        next(ref)
        state = ref.state_dict()
        epoch_before = ref.epoch
        expected = take(ref, 8)
        crossed |= ref.epoch > epoch_before
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        fresh = loader((d, m, k), mb=2, rank=1, world_size=2)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert_batches_equal(take(fresh, 8), expected)
        fresh.close()
        # the reference goes on from where it was, not from after the 8 batches
        ref.load_state_dict(state)
    assert crossed, "some of the checked windows should cross an epoch boundary"


def load_job_states(loaders, states) -> None:
    """Every new rank resumes from the old job's states; rank 0 says what the catch-up does."""
    for L in loaders:
        if L.rank == 0:
            with pytest.warns(UserWarning, match="resuming the data stream on .* Nothing is skipped or read twice"):
                L.load_job_state(states)
        else:
            L.load_job_state(states)


@pytest.mark.parametrize("handed_out", [11, 13, 16])
def test_resume_on_another_layout_skips_nothing(tmp_path, handed_out):
    spec, keys = uneven_vision_shards(tmp_path)
    window = 4
    d, m, k = make_cfgs("vision", spec, shuffle_buffer=window)
    d.num_workers = 2
    old = [loader((d, m, k), mb=1, rank=r, world_size=2) for r in range(2)]
    before = [items_with_epochs(L, handed_out) for L in old]  # each slot inside epoch 0 or 1
    states = [L.state_dict() for L in old]
    seen = Counter(p for part in before for p in part)

    for new_world in (1, 3):
        d.num_workers = 1 if new_world == 1 else 0
        new = [loader((d, m, k), mb=1, rank=r, world_size=new_world) for r in range(new_world)]
        load_job_states(new, states)
        after = new[0].source.after_catchup
        got = Counter()
        for L in new:
            while True:
                b = next(L)
                if L.epoch == after:
                    break
                got[(L.epoch, int(b["sample_id_B"]))] += 1
        total = seen + got
        for e in range(after):
            ids = {sid for (ee, sid) in total if ee == e}
            assert len(ids) == len(keys), f"epoch {e}: a sample was skipped"
        assert max(total.values()) == 1, "a sample was read twice"
        # the counts of the old job went to rank 0 of the new one
        assert new[0].counters().totals()["good"] >= sum(len(p) for p in before)


def _vision_overrides(spec, ckpt, engine):
    return [f"data.train_shards={spec}", f"engine.name={engine}", "train.max_steps=12", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.precision=fp32", "tracking.enabled=false", "model.vision.image_size=16",
            "model.vision.patch_size=4", "masking.vision.min_block_patches=2", f"checkpoint.dir={ckpt}",
            "checkpoint.every_steps=3"]


def _steps(spec, ckpt, engine, stop):
    return run_recipe("vision", _vision_overrides(spec, ckpt, engine), stop_at_step=stop)["step"]


@pytest.mark.parametrize("before,after", [("ddp", "single"), ("fsdp", "fsdp")])
def test_training_resumes_on_fewer_ranks(tmp_path, before, after):
    spec, _ = uneven_vision_shards(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    assert spawn(_steps, spec, ckpt, before, 6) == [6, 6]
    if after == "single":
        with pytest.warns(UserWarning, match="on 1 ranks x 1 workers from a checkpoint of 2 x 1"):
            assert run_single("vision", _vision_overrides(spec, ckpt, after))["step"] == 12
    else:
        assert spawn(_steps, spec, ckpt, after, None, world_size=1) == [12]
    data = torch.load(tmp_path / "ckpt" / "step_00000012" / "train_state_rank0.pt", weights_only=True)["data"]
    if after == "single":  # and on to 2 DataLoader workers, on the same world size
        with pytest.warns(UserWarning, match="on 1 ranks x 2 workers from a checkpoint of 1 x 1"):
            overrides = _vision_overrides(spec, ckpt, after) + ["train.max_steps=14", "data.num_workers=2"]
            assert run_single("vision", overrides)["step"] == 14
    # 6 steps x 4 samples were read by 2 ranks before; 35 per epoch: the catch-up ends in epoch 1
    assert data["world_size"] == 1 and data["after_catchup"] == 1
    assert DataCounters.merge(DataCounters(c) for c in data["counters"]).totals()["good"] == 12 * 4


# ----------------------------------------------------------------------------- bad input
def _noise(n, seed=0):
    return (0.2 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def _flac(n, sr=16000):
    return encode_speech_sample("x", _noise(n), sr)


def corrupted_speech_shards(tmp_path):
    """Good clips, one bad sample of each of 9 kinds in an unindexed shard, and a truncated indexed
    shard; returns (spec, expected epoch-0 counts)."""
    import soundfile as sf
    import webdataset as wds

    good = [encode_speech_sample(f"good{i:02d}", _noise(6000 + 500 * i, seed=i), 16000, label=i % 3) for i in range(24)]
    write_shard_set(str(tmp_path), good[:12], prefix="good", samples_per_shard=6)
    # the truncated shard: cut inside sample 3's first member, so samples 0..2 are read and 3..5 are lost
    index = write_shard_set(str(tmp_path), good[12:18], prefix="cut", samples_per_shard=None)
    cut_path = os.path.join(tmp_path, index["shards"][0]["name"])
    with tarfile.open(cut_path) as tf:
        firsts = {}
        for mem in tf.getmembers():
            firsts.setdefault(mem.name.split(".")[0], mem.offset_data)
    cut_at = sorted(firsts.values())[3] + 100
    with open(cut_path, "r+b") as f:
        f.truncate(cut_at)

    nan_wav = io.BytesIO()
    sf.write(nan_wav, np.array([0.1, np.nan] * 4000, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    ok = _flac(8000)
    bad = [
        ("missing_field", {"cls": b"1"}),
        ("empty", {"flac": b""}),
        ("decode_error", {"flac": b"this is not audio" * 20}),
        ("metadata_mismatch", {"flac": ok["flac"], "json": b'{"num_samples": 123}'}),
        ("sample_rate", {k: v for k, v in _flac(8000, sr=8000).items() if k != "__key__"}),
        ("oversized", {k: v for k, v in _flac(200_000).items() if k != "__key__"}),
        ("too_short", {k: v for k, v in _flac(1000).items() if k != "__key__"}),
        ("non_finite", {"wav": nan_wav.getvalue()}),
        ("bad_label", {"flac": ok["flac"], "cls": b"one"}),
    ]
    bad_path = os.path.join(tmp_path, "bad.tar")  # no index: counted from its tar headers, with a warning
    with wds.TarWriter(bad_path, encoder=False, mtime=0.0) as w:
        for i, (kind, fields) in enumerate(bad + [("good", dict(good[18 + j])) for j in range(6)]):
            fields = {**fields, "__key__": f"s{i:02d}"}
            w.write(fields)
    spec = ",".join([os.path.join(tmp_path, "good-{000000..000001}.tar"), cut_path, bad_path])
    expected = {kind: 1 for kind, _ in bad}
    expected.update(truncated_shard=1, truncated_lost=3, good=12 + 3 + 6, read=12 + 6 + len(bad) + 6)
    return spec, expected


SPEECH_DATA = ["data.speech.min_samples=4000", "data.speech.max_samples=16000", "data.max_sample_bytes=100000",
               "train.global_batch_size=4", "train.micro_batch_size=4", "train.precision=fp32"]


def test_corrupted_shards_train_to_completion_and_are_counted(tmp_path):
    from mlflow.tracking import MlflowClient

    from scaling.pretrain import run

    spec, expected = corrupted_speech_shards(tmp_path)
    steps = math.ceil(expected["good"] / 4) + 2  # past the end of epoch 0
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    recipe = load_recipe(REPO / "recipes" / "speech" / "tiny.yaml", [
        f"data.train_shards={spec}", *SPEECH_DATA, f"train.max_steps={steps}", "train.log_every=1",
        "data.max_bad_fraction=0.9", f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri={uri}"])
    with pytest.warns(UserWarning, match="truncated"):
        result = run(recipe)
    assert result.step == steps
    state = torch.load(result.checkpoint / "train_state_rank0.pt", weights_only=True)
    counters = DataCounters.merge(DataCounters(c) for c in state["data"]["counters"])
    epoch0 = counters.totals(epoch=0)
    assert {k: v for k, v in epoch0.items() if v and k != "items"} == expected
    assert set(counters.bad_by_shard) == {"bad.tar", os.path.basename(spec.split(",")[1])}
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(result.mlflow_run_id).data.metrics
    assert logged["data/bad/decode_error"] >= 1 and logged["data/bad/truncated_lost"] >= 3
    assert logged["data/samples"] == counters.totals()["good"]


def test_too_many_bad_samples_stop_the_run_naming_the_shards(tmp_path):
    from scaling.pretrain import run

    spec, _ = corrupted_speech_shards(tmp_path)
    recipe = load_recipe(REPO / "recipes" / "speech" / "tiny.yaml", [
        f"data.train_shards={spec}", *SPEECH_DATA, "train.max_steps=20", "data.max_bad_fraction=0.05",
        "data.bad_check_min_samples=10", f"checkpoint.dir={tmp_path}/ckpt", "tracking.enabled=false"])
    with pytest.warns(UserWarning, match="truncated"), pytest.raises(BadDataError, match=r"bad\.tar \(\d+\)") as err:
        run(recipe)
    assert "data.max_bad_fraction" in str(err.value)


def test_bad_kinds_are_all_named():
    assert len(BAD_KINDS) == len(set(BAD_KINDS)) >= 8
