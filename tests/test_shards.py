"""Shard tools (scaling-shards, scaling-tokenizer): CLI round trips through build_loader, the index,
and the loader's start checks (missing shard, index mismatch, other tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

from test_data import one_epoch_items
from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data import build_loader
from scaling.data.build import shards_main, tokenizer_main
from scaling.data.loader import sample_id
from scaling.data.shards import expand_shards, file_sha256, write_shard_set

# torchvision 0.29's codec deprecation notice (the calls work; see scaling.data.shards.quiet_tv_io)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

# ----------------------------------------------------------------------------- helpers
def make_cfgs(modality: str, shards: str):
    d = DataConfig(train_shards=shards, shuffle_buffer=4)
    d.speech.normalize, d.speech.min_samples, d.speech.max_samples = False, 1000, 10**6  # no crop
    d.vision.augment = False
    d.vision.mean, d.vision.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    d.text.block_size = 1024
    m = ModelConfig(modality=modality)
    m.vision.image_size, m.vision.patch_size, m.vision.channels = 16, 4, 3
    m.text.max_positions = 1024
    k = MaskingConfig()
    k.vision.min_block_patches = 2
    return d, m, k


def loader(cfgs, mb=1):
    d, m, k = cfgs
    return build_loader(d, m, k, seed=0, rank=0, world_size=1, micro_batch_size=mb)




def tar_samples(spec: str) -> dict[int, tuple[str, str, dict]]:
    """sample id -> (shard path, key, {ext: bytes}) of every sample of the shard set."""
    out = {}
    for path in expand_shards(spec):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                sid = sample_id(path, key)
                out.setdefault(sid, (path, key, {}))[2][ext] = tf.extractfile(m).read()
    return out


def shard_counts(spec: str) -> dict[str, int]:
    return {os.path.basename(p): len({m.name.split(".", 1)[0] for m in tarfile.open(p).getmembers()})
            for p in expand_shards(spec)}


def run_cli(main, argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def spec_of(summary: str) -> str:
    return summary.split(" -> ", 1)[1].split(" (index ", 1)[0]


def stem_of(key: str) -> str:
    return key.split("_", 1)[1]  # keys are <running number>_<file stem>[_l<line>]


def check_index(out_dir: str, spec: str, modality: str, prefix: str = "train") -> dict:
    with open(os.path.join(out_dir, f"{prefix}.index.json")) as f:
        index = json.load(f)
    counts = shard_counts(spec)
    assert index["format"] == "scaling-shards" and index["format_version"] == 1 and index["modality"] == modality
    assert {s["name"]: s["num_samples"] for s in index["shards"]} == counts
    assert index["num_samples"] == sum(counts.values()) and index["num_shards"] == len(counts)
    for s in index["shards"]:
        assert s["num_bytes"] == os.path.getsize(os.path.join(out_dir, s["name"]))
    return index


# ----------------------------------------------------------------------------- image
def test_image_folder_round_trip(tmp_path, capsys):
    import torchvision.io as tvio

    src = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    files = {}
    for cls, names in (("cat", ["c0", "c1", "c2"]), ("dog", ["d0", "d1"])):
        (src / cls).mkdir(parents=True)
        for i, n in enumerate(names):
            channels = 1 if n == "c2" else 3  # a grayscale PNG: expanded to the model's 3 channels
            img = torch.randint(0, 256, (channels, 16, 16), generator=g, dtype=torch.uint8)
            path = src / cls / (f"{n}.jpg" if cls == "dog" else f"{n}.png")
            (tvio.write_jpeg if cls == "dog" else tvio.write_png)(img, str(path))
            files[n] = (path, ["cat", "dog"].index(cls))
    broken = src / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "shards"

    summary = run_cli(shards_main, ["image", src, out, "--samples-per-shard", 2, "--no-progress"], capsys)
    assert "5 samples written in 3 shards" in summary and "1 input skipped" in summary
    assert f"skipped {broken}: not a decodable image" in summary
    spec = spec_of(summary)
    index = check_index(str(out), spec, "vision")
    assert index["classes"] == ["cat", "dog"] and index["num_samples"] == 5

    # stored as they are: the tar members are the source files' bytes, with the folder's label
    stored = tar_samples(spec)
    assert sorted(stem_of(k) for _, k, _ in stored.values()) == sorted(files)
    for _, key, members in stored.values():
        path, label = files[stem_of(key)]
        ext = "jpg" if path.suffix == ".jpg" else "png"
        assert set(members) == {ext, "cls"}
        assert members[ext] == path.read_bytes() and int(members["cls"]) == label

    # read back through the loader (augmentation off): the decoded source pixels and the labels
    rows = one_epoch_items(loader(make_cfgs("vision", spec)))
    assert len(rows) == 5
    for b in rows:
        path, label = files[stem_of(stored[int(b["sample_id_B"])][1])]
        expect = tvio.decode_image(str(path), mode=tvio.ImageReadMode.RGB).float() / 255
        assert torch.allclose(b["image_BCHW"][0], expect, atol=1e-6)
        assert int(b["label_B"]) == label

    # OUT already holds the set: refused without --overwrite
    with pytest.raises(SystemExit):
        shards_main(["image", str(src), str(out), "--no-progress"])
    assert "--overwrite" in capsys.readouterr().err
    summary = run_cli(shards_main, ["image", src, out, "--overwrite", "--no-progress", "--reencode", "png"], capsys)
    assert "5 samples written in 1 shard " in summary
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train.index.json"]  # old shards removed
    assert all(set(m) == {"png", "cls"} for _, _, m in tar_samples(spec_of(summary)).values())

    # a list file: path<TAB>label per line, relative to the list file
    lst = tmp_path / "list.txt"
    lst.write_text("images/cat/c0.png\t7\nimages/dog/d1.jpg 3\nimages/missing.png\t1\n")
    summary = run_cli(shards_main, ["image", lst, tmp_path / "listed", "--no-shuffle", "--no-progress"], capsys)
    assert "2 samples written" in summary and "missing.png: cannot read" in summary
    got = {stem_of(k): int(m["cls"]) for _, k, m in tar_samples(spec_of(summary)).values()}
    assert got == {"c0": 7, "d1": 3}


# ----------------------------------------------------------------------------- audio
def test_audio_folder_round_trip(tmp_path, capsys):
    import soundfile as sf
    import soxr

    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def clip(n, sr, channels=1):
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(n)
        return np.stack([x * (1 - 0.3 * c) for c in range(channels)], 1) if channels > 1 else x

    sources = {
        "a22k": (src / "a22k.wav", 22050, clip(20000, 22050)),
        "b16k": (src / "b16k.wav", 16000, clip(12000, 16000)),
        "c22k": (src / "sub" / "c22k.flac", 22050, clip(9000, 22050, channels=2)),  # stereo: mixed down
    }
    for path, sr, x in sources.values():
        sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    broken = src / "broken.wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    (src / "notes.txt").write_text("ignored")

    def reference(name):
        path = sources[name][0]
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        return x if sr == 16000 else soxr.resample(x, sr, 16000)

    out = tmp_path / "shards"
    summary = run_cli(shards_main, ["audio", src, out, "--no-progress"], capsys)
    assert "3 samples written in 1 shard " in summary and "1 input skipped" in summary
    assert f"skipped {broken}: cannot decode audio" in summary
    spec = spec_of(summary)
    index = check_index(str(out), spec, "speech")
    assert index["sample_rate"] == 16000 and "classes" not in index

    stored = tar_samples(spec)
    for _, key, members in stored.values():
        meta = json.loads(members["json"])
        assert meta == {"num_samples": reference(stem_of(key)).shape[0], "sample_rate": 16000}
        assert "cls" not in members

    rows = one_epoch_items(loader(make_cfgs("speech", spec)))
    assert len(rows) == 3
    for b in rows:
        ref = reference(stem_of(stored[int(b["sample_id_B"])][1]))
        got = b["audio_BT"][0].numpy()
        assert got.shape == ref.shape and not b["audio_padding_BT"].any()
        assert np.abs(got - np.clip(ref, -1, 1)).max() <= 1.0 / 32768 + 1e-6  # FLAC PCM_16

    # worker processes give byte-identical shards; a tsv manifest (fairseq's) with labels
    summary = run_cli(shards_main, ["audio", src, tmp_path / "w2", "--workers", 2, "--no-progress"], capsys)
    for name in ("train-000000.tar", "train.index.json"):
        assert (out / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{src}\na22k.wav\t20000\t4\nsub/c22k.flac\t9000\t2\n")
    summary = run_cli(shards_main, ["audio", tsv, tmp_path / "tsv", "--no-progress"], capsys)
    got = {stem_of(k): int(m["cls"]) for _, k, m in tar_samples(spec_of(summary)).values()}
    assert got == {"a22k": 4, "c22k": 2}


# ----------------------------------------------------------------------------- text
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly brave zebras "
         "and many small birds sing in green trees near the old river bank").split()


def write_corpus(root, n_files=5, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS, int(rng.integers(4, 10)))) for _ in range(int(rng.integers(2, 5)))]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
        docs[f"doc{i}"] = "\n".join(lines)
    return docs


def test_text_round_trip_and_loader_checks(tmp_path, capsys):
    import sentencepiece as spm

    src = tmp_path / "corpus"
    docs = write_corpus(src)
    bad = src / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe not utf-8\n")

    # tokenizers: TEXT... OUT with the option in between; bad.txt's bad line is skipped and listed
    summary = run_cli(tokenizer_main, ["train", src, "--vocab-size", 60, tmp_path / "tok1", "--no-progress"], capsys)
    assert f"skipped {bad}:2: not UTF-8" in summary
    tok1, tok2 = tmp_path / "tok1.model", tmp_path / "tok2.model"
    run_cli(tokenizer_main, ["train", src, "--vocab-size", 48, tok2, "--no-progress"], capsys)
    sp = spm.SentencePieceProcessor(model_file=str(tok1))
    assert [sp.piece_to_id(p) for p in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert file_sha256(str(tok1)) != file_sha256(str(tok2))
    info = json.loads(run_cli(tokenizer_main, ["info", tok1], capsys))
    assert info["sha256"] == file_sha256(str(tok1)) and info["vocab_size"] == sp.get_piece_size()

    # shards: one document per file; the undecodable file is skipped with its path
    out = tmp_path / "shards"
    summary = run_cli(shards_main, ["text", src, out, "--tokenizer", tok1, "--samples-per-shard", 2, "--no-progress"], capsys)
    assert "5 samples written in 3 shards" in summary and f"skipped {bad}: not UTF-8 text" in summary
    spec = spec_of(summary)
    index = check_index(str(out), spec, "text")
    assert index["tokenizer"]["sha256"] == file_sha256(str(tok1)) and index["tokenizer"]["file"] == "tok1.model"

    d, m, k = cfgs = make_cfgs("text", spec)
    d.text.tokenizer, m.text.vocab_size = str(tok1), sp.get_piece_size()
    stored = tar_samples(spec)
    rows = one_epoch_items(loader(cfgs))
    assert len(rows) == 5
    seen = set()
    for b in rows:
        name = stem_of(stored[int(b["sample_id_B"]) >> 16][1])  # text ids: (doc id << 16) | block
        expect = [0] + sp.encode(docs[name]) + [2]
        assert b["tokens_BT"][0].tolist() == expect
        seen.add(name)
    assert seen == set(docs)

    # one document per line
    summary = run_cli(shards_main, ["text", src / "doc0.txt", tmp_path / "lines", "--tokenizer", tok1, "--no-progress"], capsys)
    lines = docs["doc0"].split("\n")
    got = sorted((int(key.rsplit("_l", 1)[1]), np.frombuffer(mm["ids"], "<i4").tolist())
                 for _, key, mm in tar_samples(spec_of(summary)).values())
    assert got == [(i + 1, sp.encode(line)) for i, line in enumerate(lines)]

    # the loader refuses shards made with another tokenizer, naming both
    d.text.tokenizer = str(tok2)
    with pytest.raises(ValueError) as e:
        loader(cfgs)
    assert "tok1.model" in str(e.value) and str(tok2) in str(e.value) and "train.index.json" in str(e.value)
    d.text.tokenizer = str(tok1)
    with pytest.raises(ValueError, match="vision"):  # modality check
        loader((d, ModelConfig(modality="vision"), k))

    paths = expand_shards(spec)
    # a shard next to the set that its index does not list
    extra = os.path.join(out, "train-000007.tar")
    shutil.copy(paths[0], extra)
    with pytest.raises(ValueError, match=r"train-000007\.tar is not listed in its index .*train\.index\.json"):
        loader((dataclasses.replace(d, train_shards=spec + "," + extra), m, k))
    # a shard rewritten after its index
    with open(paths[1], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match=r"train-000001\.tar has \d+ bytes but its index"):
        loader(cfgs)
    # a missing shard
    os.remove(paths[1])
    with pytest.raises(ValueError, match=r"train-000001\.tar"):
        loader(cfgs)

    # shards without an index (older code) still load, with a warning
    d.train_shards = paths[0]
    os.remove(out / "train.index.json")
    with pytest.warns(UserWarning, match="no index"):
        L = loader(cfgs)
    assert next(L)["tokens_BT"].shape[0] == 1


def test_shard_size_limit_and_write_shard_set(tmp_path, capsys):
    src = tmp_path / "corpus"
    write_corpus(src, n_files=1)
    (src / "big.txt").write_text("\n".join(" ".join(WORDS[i % 7 :]) for i in range(60)) + "\n")
    summary = run_cli(tokenizer_main, ["train", src, "--vocab-size", 60, tmp_path / "tok", "--no-progress"], capsys)
    out = tmp_path / "shards"
    # 30 kB shards: every tar file stays under the limit (tiny samples: tar headers dominate)
    summary = run_cli(shards_main, ["text", src, out, "--tokenizer", tmp_path / "tok.model", "--doc", "line",
                                    "--shard-size", 0.03, "--no-progress"], capsys)
    spec = spec_of(summary)
    index = check_index(str(out), spec, "text")
    assert index["num_shards"] > 3 and index["num_samples"] > 60
    assert all(s["num_bytes"] <= 30_000 for s in index["shards"])
    # both limits: whichever comes first
    summary = run_cli(shards_main, ["text", src, out, "--tokenizer", tmp_path / "tok.model", "--doc", "line",
                                    "--shard-size", 0.03, "--samples-per-shard", 2, "--overwrite", "--no-progress"], capsys)
    index = check_index(str(out), spec_of(summary), "text")
    assert {s["num_samples"] for s in index["shards"][:-1]} == {2}

    # the library writer infers the modality and refuses to mix modalities
    from scaling.data.shards import encode_speech_sample, encode_text_sample

    idx = write_shard_set(str(tmp_path / "w"), [encode_text_sample("a", [5, 6])], prefix="valid")
    assert idx["modality"] == "text" and idx["index_path"].endswith("valid.index.json") and idx["spec"] == "valid-000000.tar"
    with pytest.raises(ValueError, match="is speech"):
        write_shard_set(str(tmp_path / "w2"), [encode_text_sample("a", [5]), encode_speech_sample("b", np.zeros(10))])


def test_text_demo_writes_index(tmp_path):
    from scaling.data.demo_sets import build_text_demo

    out = build_text_demo(str(tmp_path), vocab_size=120, max_chars=30_000)
    for prefix, key, n in (("train", "train_shards", out["num_train"]),
                           ("probetrain", "probe_train_shards", out["num_probe_train"]),
                           ("valid", "valid_shards", out["num_valid"])):
        index = check_index(str(tmp_path), out[key], "text", prefix)
        assert index["tokenizer"]["sha256"] == file_sha256(out["tokenizer"]) and index["num_samples"] == n
        assert index.get("labels") == (None if prefix == "train" else out["labels"])
    d, m, k = make_cfgs("text", out["train_shards"])
    d.text.tokenizer, m.text.vocab_size = out["tokenizer"], out["vocab_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # indexed and the right tokenizer: no warning
        L = loader((d, m, k), mb=2)
    assert next(L)["tokens_BT"].shape[0] == 2
    L.close()
