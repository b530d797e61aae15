"""Data layer: shard round trips, exact resume, per-sample masks, rank split, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data import build_loader, expand_shards, write_shards
from scaling.data.loader import sample_id
from scaling.data.shards import encode_speech_sample, encode_text_sample, encode_vision_sample


# ----------------------------------------------------------------------------- helpers
def make_cfgs(modality: str, shards: str = "synthetic", **data_kw):
    d = DataConfig(train_shards=shards, shuffle_buffer=data_kw.pop("shuffle_buffer", 8), **data_kw)
    d.speech.min_samples, d.speech.max_samples = 4000, 12000
    d.vision.augment = False
    d.text.block_size = 24
    m = ModelConfig(modality=modality)
    m.vision.image_size, m.vision.patch_size, m.vision.channels = 16, 4, 3
    m.text.vocab_size, m.text.max_positions = 200, 32
    k = MaskingConfig()
    k.vision.min_block_patches = 2
    return d, m, k


def loader(cfgs, *, seed=3, rank=0, world_size=1, mb=3, **kw):
    d, m, k = cfgs
    return build_loader(d, m, k, seed=seed, rank=rank, world_size=world_size, micro_batch_size=mb, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def one_epoch_items(L):
    """The batches of one epoch (per-sample rows when micro_batch_size is 1)."""
    rows = []
    while True:
        b = next(L)
        if L.epoch != 0:
            return rows
        rows.append(b)


def speech_set(n=7, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(5000, 15000))
        t = np.arange(length) / 16000
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(length)
        out.append((f"utt{i:03d}", audio.astype(np.float32), i % 3))
    return out


def vision_set(n=9, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = 1 if i % 3 == 0 else 3  # grayscale PNGs are expanded to the model's 3 channels
        out.append((f"img{i:03d}", rng.integers(0, 256, size=(c, 16, 16), dtype=np.uint8), i % 4))
    return out


def text_set(n=11, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"doc{i:03d}", rng.integers(5, 200, size=int(rng.integers(1, 60))).astype(np.int32)) for i in range(n)]


def write_set(tmp_path, modality, samples, per_shard=3):
    if modality == "speech":
        enc = (encode_speech_sample(k, a, 16000, label=lab) for k, a, lab in samples)
    elif modality == "vision":
        enc = (encode_vision_sample(k, torch.from_numpy(x), label=lab) for k, x, lab in samples)
    else:
        enc = (encode_text_sample(k, ids) for k, ids in samples)
    return write_shards(str(tmp_path / modality), enc, samples_per_shard=per_shard)


def key_of(spec: str, sid: int) -> str:
    for path in expand_shards(spec):
        for k in [f"utt{i:03d}" for i in range(50)] + [f"img{i:03d}" for i in range(50)] + [f"doc{i:03d}" for i in range(50)]:
            if sample_id(path, k) == sid:
                return k
    raise KeyError(sid)


# ----------------------------------------------------------------------------- shard specs
def test_expand_shards_and_missing_file(tmp_path):
    spec = write_set(tmp_path, "text", text_set(7), per_shard=2)
    paths = expand_shards(spec)
    assert len(paths) == 4 and all(os.path.isfile(p) for p in paths)
    assert spec.endswith("train-{000000..000003}.tar")
    assert expand_shards(",".join(paths[:2])) == paths[:2]
    os.remove(paths[2])
    with pytest.raises(ValueError, match="train-000002.tar"):
        expand_shards(spec)
    d, m, k = make_cfgs("text", spec)
    with pytest.raises(ValueError, match="train-000002.tar"):
        build_loader(d, m, k, seed=0, rank=0, world_size=1, micro_batch_size=2)


# ----------------------------------------------------------------------------- round trips
def test_speech_round_trip(tmp_path):
    data = speech_set()
    spec = write_set(tmp_path, "speech", data)
    cfgs = make_cfgs("speech", spec)
    cfgs[0].speech.normalize = False
    cfgs[0].speech.max_samples = 20000  # no crop
    from scaling.models.speech import conv_output_length

    rows = one_epoch_items(loader(cfgs, mb=1))
    by_key = {k: (a, lab) for k, a, lab in data}
    kept = [k for k, a, _ in data if a.shape[0] >= cfgs[0].speech.min_samples]
    assert sorted(key_of(spec, int(b["sample_id_B"])) for b in rows) == sorted(kept)
    for b in rows:
        audio, lab = by_key[key_of(spec, int(b["sample_id_B"]))]
        assert b["audio_BT"].shape == (1, audio.shape[0]) and not b["audio_padding_BT"].any()
        assert np.abs(b["audio_BT"][0].numpy() - audio).max() < 1.0 / 32768 + 1e-6  # PCM_16
        assert int(b["label_B"]) == lab
        assert b["mask_BT"].shape == (1, conv_output_length(audio.shape[0], cfgs[1].speech.conv_layers))
        assert b["mask_BT"].any()

    # batches: right padding, frame masks sized from the longest clip
    L = loader(cfgs, mb=4)
    b = next(L)
    lengths = (~b["audio_padding_BT"]).sum(1)
    assert b["audio_BT"].shape[1] == int(lengths.max())
    assert b["mask_BT"].shape[1] == conv_output_length(int(lengths.max()), cfgs[1].speech.conv_layers)
    for i, n in enumerate(lengths.tolist()):
        assert not b["mask_BT"][i, conv_output_length(n, cfgs[1].speech.conv_layers):].any()
        assert (b["audio_BT"][i, n:] == 0).all()


def test_speech_crop_normalize_and_wrong_rate(tmp_path):
    rng = np.random.default_rng(1)
    a8k = (0.2 * rng.standard_normal(8000)).astype(np.float32)  # 8 kHz: a bad sample, not resampled
    long = (0.2 * rng.standard_normal(30000)).astype(np.float32)  # cropped to max_samples
    spec = write_shards(str(tmp_path), [encode_speech_sample("low", a8k, 8000), encode_speech_sample("long", long, 16000)])
    cfgs = make_cfgs("speech", spec)
    cfgs[0].speech.max_samples = 20000
    L = loader(cfgs, mb=1)
    b = next(L)
    assert (~b["audio_padding_BT"]).sum().item() == 20000
    x = b["audio_BT"][0].double()
    assert abs(x.mean()) < 1e-4 and abs(x.std(unbiased=False) - 1) < 1e-3
    next(L)  # the next epoch's "long": the whole first epoch has been read
    assert L.counters().totals(epoch=0)["sample_rate"] == 1


def test_vision_round_trip_and_bad_sample(tmp_path, caplog):
    data = vision_set()
    enc = [encode_vision_sample(k, torch.from_numpy(x), label=lab) for k, x, lab in data]
    enc.insert(4, {"__key__": "broken", "png": b"not a png at all", "cls": b"1"})
    spec = write_shards(str(tmp_path), enc, samples_per_shard=4)
    d, m, k = cfgs = make_cfgs("vision", spec)
    d.vision.mean, d.vision.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    rows = one_epoch_items(loader(cfgs, mb=1))
    assert any("'broken'" in r.message and "train-000001.tar" in r.message and "decode_error" in r.message
               for r in caplog.records)
    assert len(rows) == len(data)
    by_key = {k: (x, lab) for k, x, lab in data}
    grid = (m.vision.image_size // m.vision.patch_size) ** 2
    for b in rows:
        x, lab = by_key[key_of(spec, int(b["sample_id_B"]))]
        expect = torch.from_numpy(x).float().div(255).expand(3, -1, -1)
        assert b["image_BCHW"].shape == (1, 3, 16, 16)
        assert torch.allclose(b["image_BCHW"][0], expect, atol=1e-6)
        assert int(b["label_B"]) == lab
        assert b["mask_BT"].shape == (1, grid) and b["mask_BT"].any()


def test_vision_augment_is_per_sample(tmp_path):
    spec = write_set(tmp_path, "vision", vision_set(8))
    d, m, k = cfgs = make_cfgs("vision", spec)
    d.vision.augment = True
    d.vision.crop_scale = [0.3, 1.0]
    by_id = {}
    for mb in (1, 4):
        rows = take(loader(cfgs, mb=mb), 8 // mb)
        for b in rows:
            for i, sid in enumerate(b["sample_id_B"].tolist()):
                if sid in by_id:
                    assert torch.equal(by_id[sid], b["image_BCHW"][i])
                by_id[sid] = b["image_BCHW"][i]
    # the global torch RNG is not consumed by the augmentation
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    next(loader(cfgs, mb=2))
    assert torch.equal(torch.rand(3), a)


def test_text_round_trip(tmp_path):
    data = text_set()
    spec = write_set(tmp_path, "text", data)
    d, m, k = cfgs = make_cfgs("text", spec)
    content = d.text.block_size - 2
    rows = one_epoch_items(loader(cfgs, mb=1))
    got = {}
    for b in rows:
        sid = int(b["sample_id_B"])
        got[(key_of(spec, sid >> 16), sid & 0xFFFF)] = b
    expected = {}
    for key, ids in data:
        for j, s in enumerate(range(0, len(ids), content)):
            expected[(key, j)] = np.concatenate([[0], ids[s : s + content], [2]])
    assert got.keys() == expected.keys()
    for kk, toks in expected.items():
        b = got[kk]
        assert b["tokens_BT"].dtype == torch.int64
        assert b["tokens_BT"][0].tolist() == toks.tolist()
        inp, mask = b["input_tokens_BT"][0], b["mask_BT"][0]
        assert (inp[mask] == m.text.mask_id).all()
        assert torch.equal(inp[~mask], b["tokens_BT"][0][~mask])
        assert not mask[0] and not mask[-1]  # BOS / EOS never masked

    L = loader(cfgs, mb=5)
    b = next(L)
    pad = b["padding_mask_BT"]
    assert (b["tokens_BT"][pad] == m.text.pad_id).all() and (b["input_tokens_BT"][pad] == m.text.pad_id).all()
    assert not b["mask_BT"][pad].any()
    assert b["tokens_BT"].shape[1] == int((~pad).sum(1).max()) <= d.text.block_size


# ----------------------------------------------------------------------------- exact resume
def _resume_check(cfgs, mb=3, before=5, after=4, **kw):
    ref = loader(cfgs, mb=mb, **kw)
    first = take(ref, before)
    state = ref.state_dict()
    epoch_at_save = ref.epoch
    expected = take(ref, after)
    # the state survives torch.save / torch.load(weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = loader(cfgs, mb=mb, **kw)
    fresh.load_state_dict(state)
    assert fresh.epoch == epoch_at_save
    got = take(fresh, after)
    assert_batches_equal(got, expected)
    assert ref.epoch >= 1, "the check should cross an epoch boundary"
    return first


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_resume_synthetic(modality):
    _resume_check(make_cfgs(modality), synthetic_epoch_size=16)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_resume_shards(tmp_path, modality):
    spec = write_set(tmp_path, modality, vision_set(10) if modality == "vision" else text_set(6))
    # text: 6 docs give about 12 blocks, so 5+4 batches of 3 cross an epoch boundary and the
    # checkpoint falls inside multi-block documents
    _resume_check(make_cfgs(modality, spec, shuffle_buffer=4))


@pytest.mark.parametrize("source", ["synthetic", "shards"])
def test_resume_bucketed_speech(tmp_path, source):
    # length-bucketed batches (max_batch_audio_samples): the cursor is (window, next batch of it)
    spec = "synthetic" if source == "synthetic" else write_set(tmp_path, "speech", speech_set(10))
    kw = {"synthetic_epoch_size": 16} if source == "synthetic" else {}
    first = _resume_check(make_cfgs("speech", spec, shuffle_buffer=4), mb=0, max_batch_audio_samples=30_000, **kw)
    assert any(b["audio_BT"].shape[0] > 1 for b in first)
    assert all(b["audio_BT"].numel() <= 30_000 for b in first)


def test_resume_mid_document_every_position(tmp_path):
    spec = write_set(tmp_path, "text", text_set(5))
    cfgs = make_cfgs("text", spec)
    ref = take(loader(cfgs, mb=1), 20)
    for cut in range(1, 12):
        L = loader(cfgs, mb=1)
        take(L, cut)
        st = L.state_dict()
        F = loader(cfgs, mb=1)
        F.load_state_dict(st)
        assert_batches_equal(take(F, 3), ref[cut : cut + 3])


def test_state_dict_rejects_other_layout(tmp_path):
    cfgs = make_cfgs("text")
    st = loader(cfgs, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader(cfgs, world_size=1).load_state_dict(st)


# ----------------------------------------------------------------------------- masks
def _masks_by_id(cfgs, mb, n_samples, **kw):
    out = {}
    L = loader(cfgs, mb=mb, **kw)
    while len(out) < n_samples:
        b = next(L)
        for i, sid in enumerate(b["sample_id_B"].tolist()):
            row = b["mask_BT"][i]
            if "audio_padding_BT" in b:
                from scaling.models.speech import conv_output_length

                n = int((~b["audio_padding_BT"][i]).sum())
                row = row[: conv_output_length(n, cfgs[1].speech.conv_layers)]
            elif "padding_mask_BT" in b:
                row = row[~b["padding_mask_BT"][i]]
            out.setdefault(sid, row.clone())
    return out


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_masks_per_sample_not_per_batch(tmp_path, modality):
    data = {"speech": speech_set, "vision": vision_set, "text": text_set}[modality](8)
    spec = write_set(tmp_path, modality, data)
    cfgs = make_cfgs(modality, spec)
    a = _masks_by_id(cfgs, 1, 6)
    b = _masks_by_id(cfgs, 5, 6)
    common = a.keys() & b.keys()
    assert len(common) >= 5
    for sid in common:
        assert torch.equal(a[sid], b[sid])
    rows = [a[s] for s in sorted(common)]
    assert any(not torch.equal(rows[0], r) for r in rows[1:]), "masks should differ across samples"
    # the next epoch draws new masks for the same samples
    L = loader(cfgs, mb=1)
    per_epoch = {0: {}, 1: {}}
    while L.epoch < 2:
        bb = next(L)
        if L.epoch < 2:
            per_epoch[L.epoch][int(bb["sample_id_B"])] = bb["mask_BT"][0]
    assert per_epoch[0].keys() == per_epoch[1].keys()
    assert any(not torch.equal(per_epoch[0][s], per_epoch[1][s]) for s in per_epoch[0])


def test_synthetic_masks_independent_of_micro_batch_and_rank():
    cfgs = make_cfgs("vision")
    a = _masks_by_id(cfgs, 2, 12, synthetic_epoch_size=1000)
    b = _masks_by_id(cfgs, 6, 12, synthetic_epoch_size=1000)
    r1 = _masks_by_id(cfgs, 3, 6, rank=1, world_size=2, synthetic_epoch_size=1000)
    for sid in a.keys() & b.keys():
        assert torch.equal(a[sid], b[sid])
    for sid in a.keys() & r1.keys():
        assert torch.equal(a[sid], r1[sid])
    assert len(a.keys() & r1.keys()) >= 5


# ----------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("per_shard", [2, 100])  # 5 shards, and 1 shard (< world_size: split samples)
def test_two_ranks_cover_epoch_exactly_once(tmp_path, per_shard):
    data = vision_set(10)
    spec = write_set(tmp_path, "vision", data, per_shard=per_shard)
    cfgs = make_cfgs("vision", spec)
    seen = []
    for rank in range(2):
        seen += [int(b["sample_id_B"]) for b in one_epoch_items(loader(cfgs, mb=1, rank=rank, world_size=2))]
    assert len(seen) == len(data) == len(set(seen))
    assert sorted(key_of(spec, sid) for sid in seen) == sorted(k for k, _, _ in data)


def test_epochs_reshuffle(tmp_path):
    spec = write_set(tmp_path, "vision", vision_set(12))
    L = loader(make_cfgs("vision", spec), mb=1)
    e0 = [int(next(L)["sample_id_B"]) for _ in range(12)]
    e1 = [int(next(L)["sample_id_B"]) for _ in range(12)]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_synthetic_shapes_and_determinism():
    for modality in ("speech", "vision", "text"):
        cfgs = make_cfgs(modality)
        a, b = next(loader(cfgs, mb=4)), next(loader(cfgs, mb=4))
        assert_batches_equal([a], [b])
        c = next(loader(cfgs, mb=4, seed=4))
        assert not all(torch.equal(a[k], c[k]) for k in a if k in c and a[k].shape == c[k].shape)
        for t in a.values():
            assert t.device.type == "cpu"


# ----------------------------------------------------------------------------- demo builder (fast one only)
def test_text_demo_builder_tiny(tmp_path):
    import webdataset as wds

    from scaling.data.demo_sets import TEXT_GROUPS, build_text_demo, stdlib_docstring_files

    out = build_text_demo(str(tmp_path), vocab_size=120, max_chars=60_000)
    assert os.path.isfile(out["tokenizer"])
    d, m, k = make_cfgs("text", out["train_shards"])
    m.text.vocab_size = out["vocab_size"]
    d.text.block_size, m.text.max_positions = 32, 32
    b = next(build_loader(d, m, k, seed=0, rank=0, world_size=1, micro_batch_size=4))
    assert b["tokens_BT"].max() < out["vocab_size"] and (b["tokens_BT"][:, 0] == 0).all()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=out["tokenizer"])
    assert [sp.piece_to_id(p) for p in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]

    # The labelled probe splits: every group in both, split by whole source files, and no held-out
    # docstring among the pretraining or probe-train samples.
    def samples(spec):
        return [(s["ids"], int(s["cls"]) if "cls" in s else None)
                for s in wds.WebDataset(expand_shards(spec), shardshuffle=False)]

    train, probe_train, valid = (samples(out[key]) for key in ("train_shards", "probe_train_shards", "valid_shards"))
    assert out["num_classes"] == len(TEXT_GROUPS) and out["labels"] == [name for name, _ in TEXT_GROUPS]
    assert len(probe_train) == out["num_probe_train"] and len(valid) == out["num_valid"]
    assert {y for _, y in train} == {None}
    assert {y for _, y in probe_train} == {y for _, y in valid} == set(range(len(TEXT_GROUPS)))
    assert not {ids for ids, _ in valid} & {ids for ids, _ in train + probe_train}
    packages = sorted(p for _, group in TEXT_GROUPS for p in group)
    held = set(out["valid_files"])
    files = {path: len(docs) for path, docs in stdlib_docstring_files(packages)}
    assert held < set(files) and sum(files[p] for p in held) == len(valid)
    assert sum(n for p, n in files.items() if p not in held) == len(probe_train)
