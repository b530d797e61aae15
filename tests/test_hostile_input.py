"""Hostile input: every decode path converts a sample to what the model takes or skips it as a
BadSample of a named kind (a table of inputs), scaling-shards builds a hostile corpus to the end with
its skips counted, and a short training run over hostile shards completes with every bad sample
counted and every good one kept."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.config import DataConfig, MaskingConfig, ModelConfig, load_recipe
from scaling.data import build_loader
from scaling.data.build import shards_main, train_tokenizer
from scaling.data.loader import sample_id
from scaling.data.quality import BadSample, DataCounters
from scaling.data.shards import write_shard_set
from scaling.modalities import build_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


# ----------------------------------------------------------------------------- encoders of hostile bytes
def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(h=8, w=9, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GRAY16 = np.random.default_rng(1).integers(0, 65536, (8, 9), dtype=np.uint16)
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 77, 177]], dtype=np.uint8)
PAL_INDEX = np.random.default_rng(2).integers(0, 4, (8, 9), dtype=np.uint8)
FRAME_COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
LA = np.random.default_rng(3).integers(0, 256, (8, 9, 2), dtype=np.uint8)
RGBA = np.random.default_rng(4).integers(0, 256, (8, 9, 4), dtype=np.uint8)
TWO_COLORS = np.concatenate([np.full((8, 16, 3), (200, 30, 60), np.uint8), np.full((8, 16, 3), (20, 180, 90), np.uint8)])


def png16() -> bytes:
    return pil_bytes(Image.fromarray(GRAY16), "PNG")


def palette_png() -> bytes:
    img = Image.fromarray(PAL_INDEX, "P")
    img.putpalette(PALETTE.flatten().tolist())
    return pil_bytes(img, "PNG")


def animated(fmt: str, **kw) -> bytes:
    frames = [Image.new("RGB", (9, 8), c) for c in FRAME_COLORS]
    return pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)


def cmyk_jpeg() -> bytes:
    return pil_bytes(Image.fromarray(TWO_COLORS).convert("CMYK"), "JPEG", quality=100)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (the CRC fixed): a few dozen bytes that would
    decode to width*height pixels."""
    data = bytearray(pil_bytes(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def audio_bytes(audio: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def noise(n: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    shape = (n, channels) if channels else (n,)
    return (0.2 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


EIGHT_CHANNELS = noise(6000, 8, seed=5)
TWO_CHANNELS_24 = noise(6000, 2, seed=6)


# ----------------------------------------------------------------------------- the table
def processor(modality: str, channels: int = 3):
    d = DataConfig(train_shards="synthetic")
    d.speech.min_samples, d.speech.max_samples, d.speech.max_seconds = 4000, 12000, 2.0
    d.vision.augment = False
    d.vision.mean, d.vision.std = [0.0] * 4, [1.0] * 4
    d.text.block_size = 24
    m = ModelConfig(modality=modality)
    m.vision.image_size, m.vision.patch_size, m.vision.channels = 16, 4, channels
    m.text.vocab_size, m.text.max_positions = 200, 32
    k = MaskingConfig()
    k.vision.min_block_patches = 2
    return build_processor(d, m, k, seed=0)


def gray_of(x: np.ndarray) -> np.ndarray:  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
    return (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])


def _ok(shape, dtype, expect=None, atol=0):
    return ("ok", shape, dtype, expect, atol)


def _bad(kind, message):
    return ("bad", kind, message)


# (name, modality, model channels, raw members, outcome): ("ok", decoded shape, dtype, expected
# values or None, atol) or ("bad", kind, a part of the message).
CASES = [
    ("16-bit gray PNG", "vision", 3, lambda: {"png": png16()},
     _ok((3, 8, 9), torch.uint8, lambda: np.repeat((GRAY16 >> 8)[None], 3, 0))),
    ("palette PNG", "vision", 3, lambda: {"png": palette_png()},
     _ok((3, 8, 9), torch.uint8, lambda: PALETTE[PAL_INDEX].transpose(2, 0, 1))),
    ("CMYK JPEG", "vision", 3, lambda: {"jpg": cmyk_jpeg()},
     _ok((3, 16, 16), torch.uint8, lambda: TWO_COLORS.transpose(2, 0, 1), atol=3)),
    ("CMYK JPEG for an RGBA model", "vision", 4, lambda: {"jpg": cmyk_jpeg()},
     _ok((4, 16, 16), torch.uint8, lambda: np.concatenate([TWO_COLORS, np.full((16, 16, 1), 255, np.uint8)], -1)
         .transpose(2, 0, 1), atol=3)),
    ("animated GIF in a png member", "vision", 3, lambda: {"png": animated("GIF")},
     _ok((3, 8, 9), torch.uint8, lambda: np.broadcast_to(np.array(FRAME_COLORS[0], np.uint8)[:, None, None], (3, 8, 9)))),
    ("animated WebP", "vision", 3, lambda: {"webp": animated("WEBP", lossless=True)},
     _ok((3, 8, 9), torch.uint8, lambda: np.broadcast_to(np.array(FRAME_COLORS[0], np.uint8)[:, None, None], (3, 8, 9)))),
    ("LA PNG for an RGB model", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(LA, "LA"), "PNG")},
     _ok((3, 8, 9), torch.uint8, lambda: np.repeat(LA[None, ..., 0], 3, 0))),
    ("RGBA PNG for an RGB model", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(RGBA, "RGBA"), "PNG")},
     _ok((3, 8, 9), torch.uint8, lambda: RGBA[..., :3].transpose(2, 0, 1))),
    ("grayscale PNG for an RGB model", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(rgb()[..., 0]), "PNG")},
     _ok((3, 8, 9), torch.uint8, lambda: np.repeat(rgb()[None, ..., 0], 3, 0))),
    ("RGB WebP for a gray model", "vision", 1, lambda: {"webp": pil_bytes(Image.fromarray(rgb()), "WEBP", lossless=True)},
     _ok((1, 8, 9), torch.uint8, lambda: gray_of(rgb().astype(np.float64))[None], atol=1)),
    ("RGB PNG for an RGBA model", "vision", 4, lambda: {"png": pil_bytes(Image.fromarray(rgb()), "PNG")},
     _ok((4, 8, 9), torch.uint8, lambda: np.concatenate([rgb(), np.full((8, 9, 1), 255, np.uint8)], -1).transpose(2, 0, 1))),
    ("BMP in a png member", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(rgb()), "BMP")},
     _ok((3, 8, 9), torch.uint8, lambda: rgb().transpose(2, 0, 1))),
    ("bomb: 389 bytes declaring 10000x10000", "vision", 3, lambda: {"png": png_claiming(10000, 10000)},
     _bad("too_large", "10000x10000 image (100000000 pixels) > data.vision.max_pixels 67108864")),
    ("bomb past PIL's own limit: 30000x30000", "vision", 3, lambda: {"png": png_claiming(30000, 30000)},
     _bad("too_large", "exceeds limit")),
    ("PNG with a short IDAT (torchvision's decoder crashed on it)", "vision", 3, lambda: {"png": png_claiming(64, 64)},
     _bad("decode_error", "not a decodable image (png)")),
    ("truncated PNG", "vision", 3, lambda: {"png": half(pil_bytes(Image.fromarray(rgb(64, 64)), "PNG"))},
     _bad("decode_error", "not a decodable image (png)")),
    ("truncated JPEG", "vision", 3, lambda: {"jpg": half(pil_bytes(Image.fromarray(rgb(64, 64)), "JPEG"))},
     _bad("decode_error", "not a decodable image")),
    ("empty image file", "vision", 3, lambda: {"png": b""}, _bad("empty", "png member has zero bytes")),
    ("not an image", "vision", 3, lambda: {"png": b"GET / HTTP/1.1\r\n" * 8},
     _bad("decode_error", "not a decodable image (unknown format)")),
    ("32-bit integer TIFF", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(GRAY16.astype(np.int32)), "TIFF")},
     _bad("decode_error", "mode I (32-bit pixels) is not supported")),
    ("no image member", "vision", 3, lambda: {"txt": b"x"}, _bad("missing_field", "no png/jpg/jpeg/webp member")),
    ("non-integer label", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(rgb()), "PNG"), "cls": b"cat"},
     _bad("bad_label", "cls member b'cat' is not an integer")),
    ("negative label", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(rgb()), "PNG"), "cls": b"-3"},
     _bad("bad_label", "cls member -3 is not in [0, 2^63)")),
    ("label past int64", "vision", 3, lambda: {"png": pil_bytes(Image.fromarray(rgb()), "PNG"), "cls": b"9" * 30},
     _bad("bad_label", "is not in [0, 2^63)")),
    ("wrong-rate audio", "speech", 0, lambda: {"wav": audio_bytes(noise(8000), 8000)},
     _bad("sample_rate", "8000 Hz, not data.speech.sample_rate 16000")),
    ("8-channel audio", "speech", 0, lambda: {"wav": audio_bytes(EIGHT_CHANNELS, 16000)},
     _ok((6000,), np.float32, lambda: EIGHT_CHANNELS.mean(axis=1), atol=1e-6)),
    ("24-bit stereo FLAC", "speech", 0, lambda: {"flac": audio_bytes(TWO_CHANNELS_24, 16000, "FLAC", "PCM_24")},
     _ok((6000,), np.float32, lambda: TWO_CHANNELS_24.mean(axis=1), atol=1e-6)),
    ("0-frame audio", "speech", 0, lambda: {"wav": audio_bytes(np.zeros(0, np.float32), 16000)},
     _bad("empty", "audio has zero frames")),
    ("too long audio", "speech", 0, lambda: {"flac": audio_bytes(noise(48000), 16000, "FLAC", "PCM_16")},
     _bad("too_large", "3.0 s of audio (48000 frames at 16000 Hz) > data.speech.max_seconds 2")),
    ("NaN float audio", "speech", 0, lambda: {"wav": audio_bytes(np.array([0.1, np.nan] * 4000, np.float32), 16000)},
     _bad("non_finite", "audio holds NaN or inf")),
    ("truncated FLAC", "speech", 0, lambda: {"flac": half(audio_bytes(noise(16000), 16000, "FLAC", "PCM_16"))},
     _bad("decode_error", "cannot decode audio")),
    ("not audio", "speech", 0, lambda: {"flac": b"this is not audio" * 20}, _bad("decode_error", "Format not recognised")),
    ("json nested 100000 deep", "speech", 0, lambda: {"wav": audio_bytes(noise(8000), 16000), "json": b"[" * 100000},
     _bad("metadata_mismatch", "json member is not JSON")),
    ("json number past float", "speech", 0,
     lambda: {"wav": audio_bytes(noise(8000), 16000), "json": b'{"num_samples": 1e400}'},
     _bad("metadata_mismatch", "json num_samples inf != 8000 decoded")),
    ("ids not int32", "text", 0, lambda: {"ids": b"\x01\x02\x03\x04\x05"}, _bad("decode_error", "not a multiple of 4")),
    ("ids outside the vocabulary", "text", 0, lambda: {"ids": np.array([5, 900], "<i4").tobytes()},
     _bad("bad_tokens", "outside [0, 200)")),
    ("empty ids", "text", 0, lambda: {"ids": b""}, _bad("empty", "ids member has zero bytes")),
]


@pytest.mark.parametrize("name, modality, channels, members, outcome", CASES, ids=[c[0] for c in CASES])
def test_hostile_sample(name, modality, channels, members, outcome):
    proc = processor(modality, channels or 3)
    raw = {"__key__": "k", "__url__": "shard.tar", **members()}
    if outcome[0] == "bad":
        _, kind, message = outcome
        with pytest.raises(BadSample) as err:
            proc.from_raw(raw, 0, 1)
        assert err.value.kind == kind, str(err.value)
        assert message in str(err.value)
        return
    _, shape, dtype, expect, atol = outcome
    decoded = proc.decode(raw)
    assert tuple(decoded.shape) == shape and decoded.dtype == dtype
    got = np.asarray(decoded, dtype=np.float64)
    np.testing.assert_allclose(got, np.asarray(expect(), dtype=np.float64), rtol=0, atol=atol)
    items = proc.from_raw(raw, 0, 1)  # and the rest of the path: crop, masks
    assert len(items) == 1


def test_case_table_is_large_and_covers_every_modality():
    assert len(CASES) >= 20 and {c[1] for c in CASES} == {"vision", "speech", "text"}


def test_a_bug_in_a_processor_still_raises_naming_the_sample(tmp_path, monkeypatch):
    from scaling.modalities.vision import VisionProcessor

    index = write_shard_set(str(tmp_path), [{"__key__": "s0", "png": pil_bytes(Image.fromarray(rgb()), "PNG")}])
    d, m, k = processor("vision").data_cfg, processor("vision").model_cfg, processor("vision").masking_cfg
    d.train_shards = os.path.join(tmp_path, index["spec"])

    def broken(self, image, epoch, sample_id, label):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(VisionProcessor, "items", broken)
    with pytest.raises(ZeroDivisionError) as err:
        next(build_loader(d, m, k, seed=0, rank=0, world_size=1, micro_batch_size=1))
    assert "while processing sample 's0' of shard" in "".join(getattr(err.value, "__notes__", []))


# ----------------------------------------------------------------------------- scaling-shards
def run_cli(argv, capsys) -> str:
    assert shards_main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def stored(out_dir) -> dict[str, dict]:
    """file stem -> tar members of every sample the build wrote."""
    got = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out_dir, name)) as tf:
                for mem in tf.getmembers():
                    key, ext = mem.name.split(".", 1)
                    got.setdefault(key.split("_", 1)[1], {})[ext] = tf.extractfile(mem).read()
    return got


def index_of(out_dir) -> dict:
    with open(os.path.join(out_dir, "train.index.json")) as f:
        return json.load(f)


def image_corpus(root):
    """SRC/{cat,dog}/ with good, convertible and bad images and three kinds of bad symlinks; returns
    (stems the build must write with their labels, expected skips by reason)."""
    cat, dog = root / "src" / "cat", root / "src" / "dog"
    cat.mkdir(parents=True)
    dog.mkdir()
    write = {
        cat / "good0.png": pil_bytes(Image.fromarray(rgb(seed=10)), "PNG"),
        cat / "good1.jpg": pil_bytes(Image.fromarray(rgb(seed=11)), "JPEG"),
        cat / "sixteen.png": png16(),
        cat / "palette.png": palette_png(),
        dog / "cmyk.jpg": cmyk_jpeg(),
        dog / "la.png": pil_bytes(Image.fromarray(LA, "LA"), "PNG"),
        dog / "rgba.png": pil_bytes(Image.fromarray(RGBA, "RGBA"), "PNG"),
        dog / "apng.png": animated("PNG"),
        dog / "anim.gif": animated("GIF"),  # not stored as it is: GIF; --reencode converts its first frame
        dog / "bomb.png": png_claiming(10000, 10000),
        dog / "cut.png": half(pil_bytes(Image.fromarray(rgb(64, 64)), "PNG")),
        dog / "cut.jpg": half(pil_bytes(Image.fromarray(rgb(64, 64)), "JPEG")),
        dog / "zero.png": b"",
        dog / "text.png": b"not an image at all",
        root / "outside.png": pil_bytes(Image.fromarray(rgb(seed=12)), "PNG"),
    }
    for path, data in write.items():
        path.write_bytes(data)
    (root / "src" / "loop").symlink_to("..")  # out of the source: os.walk(followlinks) wrote copies for ever
    (cat / "again").symlink_to("..")  # back into the source, a folder already read
    (dog / "alias.png").symlink_to(cat / "good0.png")  # a file already read (as cat/good0)
    (dog / "escape.png").symlink_to(root / "outside.png")
    (dog / "dangling.png").symlink_to(root / "nowhere.png")
    labels = {"good0": 0, "good1": 0, "sixteen": 0, "palette": 0, "cmyk": 1, "la": 1, "rgba": 1, "apng": 1}
    skips = {"too_large": 1, "decode_error": 3, "empty": 1, "symlink": 5, "unsupported_format": 1}
    return labels, skips


def test_shards_image_corpus_completes_with_skips_counted(tmp_path, capsys):
    labels, skips = image_corpus(tmp_path)
    src = tmp_path / "src"
    summary = run_cli(["image", src, tmp_path / "out", "--no-progress"], capsys)
    total = sum(skips.values())
    assert f"{len(labels)} samples written" in summary and f"{total} inputs skipped" in summary
    assert "(" + ", ".join(f"{k} {n}" for k, n in sorted(skips.items())) + ")" in summary
    assert f"skipped {src / 'loop'}: symlink to {tmp_path}, outside the source" in summary
    assert f"skipped {src / 'cat' / 'again'}: symlink to {src}, a folder already read" in summary
    assert f"skipped {src / 'dog' / 'bomb.png'}: 10000x10000 image (100000000 pixels) > --max-pixels" in summary
    assert f"skipped {src / 'dog' / 'anim.gif'}: gif images are not stored as they are" in summary
    index = index_of(tmp_path / "out")
    assert index["skipped"] == skips and index["classes"] == ["cat", "dog"]
    got = stored(tmp_path / "out")
    assert {stem: int(m["cls"]) for stem, m in got.items()} == labels
    assert got["sixteen"]["png"] == png16()  # stored as it is; the loader converts it

    # --reencode: the same inputs become 8-bit PNGs of the first frame, the GIF included
    summary = run_cli(["image", src, tmp_path / "png", "--reencode", "png", "--no-progress", "--workers", 2], capsys)
    del skips["unsupported_format"]
    labels["anim"] = 1
    assert f"{len(labels)} samples written" in summary and index_of(tmp_path / "png")["skipped"] == skips
    got = stored(tmp_path / "png")
    assert {stem: int(m["cls"]) for stem, m in got.items()} == labels
    sixteen = np.array(Image.open(io.BytesIO(got["sixteen"]["png"])))
    assert sixteen.dtype == np.uint8 and np.array_equal(sixteen, GRAY16 >> 8)
    first = np.array(Image.open(io.BytesIO(got["anim"]["png"])).convert("RGB"))
    assert (first == np.array(FRAME_COLORS[0], np.uint8)).all()


def test_shards_audio_corpus_converts_or_skips(tmp_path, capsys):
    src = tmp_path / "audio"
    src.mkdir()
    files = {
        "good.flac": audio_bytes(noise(16000, seed=1), 16000, "FLAC", "PCM_16"),
        "rate8k.wav": audio_bytes(noise(8000, seed=2), 8000, "WAV", "PCM_16"),  # resampled to 16 kHz
        "eight.wav": audio_bytes(EIGHT_CHANNELS, 16000),  # mixed to mono
        "zero.wav": audio_bytes(np.zeros(0, np.float32), 16000),
        "long.flac": audio_bytes(noise(48000, seed=3), 16000, "FLAC", "PCM_16"),
        "nan.wav": audio_bytes(np.array([0.1, np.nan] * 4000, np.float32), 16000),
        "cut.flac": half(audio_bytes(noise(16000, seed=4), 16000, "FLAC", "PCM_16")),
        "junk.wav": b"RIFF....not a wav at all" * 10,
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    summary = run_cli(["audio", src, tmp_path / "out", "--max-seconds", 2, "--no-progress"], capsys)
    skips = {"decode_error": 2, "empty": 1, "non_finite": 1, "too_large": 1}
    assert "3 samples written" in summary and "5 inputs skipped" in summary
    assert f"skipped {src / 'long.flac'}: 3.0 s of audio (48000 frames at 16000 Hz) > --max-seconds 2" in summary
    assert index_of(tmp_path / "out")["skipped"] == skips
    import soundfile as sf

    got = {stem: sf.read(io.BytesIO(m["flac"])) for stem, m in stored(tmp_path / "out").items()}
    assert sorted(got) == ["eight", "good", "rate8k"]
    assert all(a.ndim == 1 and sr == 16000 for a, sr in got.values())
    assert abs(got["rate8k"][0].shape[0] - 16000) <= 1  # 1 s at 8 kHz -> 1 s at 16 kHz
    np.testing.assert_allclose(got["eight"][0], EIGHT_CHANNELS.mean(axis=1), atol=1 / 2**15 + 1e-7)


def test_shards_text_corpus_skips_bad_encodings(tmp_path, capsys):
    src = tmp_path / "text"
    src.mkdir()
    words = "the cat sat on a mat while a dog ran far away from the big red house".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 30)) for _ in range(4)]
    tok = train_tokenizer((d for _ in range(20) for d in docs), str(tmp_path / "tok"), 60)
    (src / "good0.txt").write_text(docs[0])
    (src / "good1.txt").write_text(docs[1])
    (src / "utf16.txt").write_bytes(docs[2].encode("utf-16"))  # a BOM: decoded, not skipped
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") + docs[3].encode())
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.txt").write_bytes(b" \n\t\n")
    (src / "loop").symlink_to(".")
    summary = run_cli(["text", src, tmp_path / "out", "--tokenizer", tok, "--no-progress"], capsys)
    assert "3 samples written" in summary and "4 inputs skipped" in summary
    assert f"skipped {src / 'latin1.txt'}: not UTF-8 text (bad byte at offset 3)" in summary
    assert index_of(tmp_path / "out")["skipped"] == {"empty": 2, "not_utf8": 1, "symlink": 1}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    got = {stem: np.frombuffer(m["ids"], "<i4").tolist() for stem, m in stored(tmp_path / "out").items()}
    assert got == {"good0": sp.encode(docs[0]), "good1": sp.encode(docs[1]), "utf16": sp.encode(docs[2])}


# ----------------------------------------------------------------------------- training over hostile shards
def hostile_vision_shards(tmp_path):
    """Good and convertible images (for the 1-channel tiny recipe) and one bad sample of each kind
    an image can have, in two shards; returns (spec, good keys, expected bad counts)."""
    import webdataset as wds

    good = {
        "rgb": {"png": pil_bytes(Image.fromarray(rgb(28, 28, seed=20)), "PNG"), "cls": b"1"},
        "gray": {"png": pil_bytes(Image.fromarray(rgb(28, 28, seed=21)[..., 0]), "PNG"), "cls": b"0"},
        "sixteen": {"png": png16()},
        "palette": {"png": palette_png(), "cls": b"2"},
        "cmyk": {"jpg": cmyk_jpeg()},
        "gif": {"png": animated("GIF")},
        "webp": {"webp": animated("WEBP", lossless=True)},
        "la": {"png": pil_bytes(Image.fromarray(LA, "LA"), "PNG")},
        "rgba": {"png": pil_bytes(Image.fromarray(RGBA, "RGBA"), "PNG")},
        "jpeg": {"jpg": pil_bytes(Image.fromarray(rgb(30, 20, seed=22)), "JPEG")},
    }
    bad = {
        "bomb": ("too_large", {"png": png_claiming(10000, 10000)}),
        "cutpng": ("decode_error", {"png": half(pil_bytes(Image.fromarray(rgb(64, 64)), "PNG"))}),
        "cutjpg": ("decode_error", {"jpg": half(pil_bytes(Image.fromarray(rgb(64, 64)), "JPEG"))}),
        "text": ("decode_error", {"png": b"not an image"}),
        "zero": ("empty", {"png": b""}),
        "label": ("bad_label", {"png": good["rgb"]["png"], "cls": b"one"}),
        "nopng": ("missing_field", {"cls": b"1"}),
    }
    samples = [{"__key__": k, **v} for k, v in good.items()] + [{"__key__": k, **v} for k, (_, v) in bad.items()]
    order = np.random.default_rng(0).permutation(len(samples))
    samples = [samples[i] for i in order]
    paths = [os.path.join(tmp_path, f"hostile-{i:06d}.tar") for i in range(2)]
    for i, path in enumerate(paths):  # unindexed: counted from their headers, with a warning
        with wds.TarWriter(path, encoder=False, mtime=0.0) as w:
            for s in samples[i::2]:
                w.write(s)
    expected = {}
    for kind, _ in bad.values():
        expected[kind] = expected.get(kind, 0) + 1
    return ",".join(paths), good, bad, expected


def test_training_over_hostile_shards_counts_every_bad_sample_and_keeps_every_good_one(tmp_path, caplog):
    from scaling.pretrain import run

    spec, good, bad, expected = hostile_vision_shards(tmp_path)
    # every good sample, once, through the loader of the recipe's data (1 channel, 28x28)
    recipe = load_recipe(os.path.join(REPO, "recipes", "vision", "tiny.yaml"), [f"data.train_shards={spec}"])
    with pytest.warns(UserWarning, match="no index"), caplog.at_level(logging.WARNING, "scaling.data"):
        L = build_loader(recipe.data, recipe.model, recipe.masking, seed=0, rank=0, world_size=1, micro_batch_size=1)
        ids = []
        while True:
            b = next(L)
            if L.epoch != 0:
                break
            assert b["image_BCHW"].shape == (1, 1, 28, 28) and torch.isfinite(b["image_BCHW"]).all()
            ids.append(int(b["sample_id_B"]))
    shard_of = {s: p for p in spec.split(",") for s in [m.name.split(".")[0] for m in tarfile.open(p)]}
    assert sorted(ids) == sorted(sample_id(shard_of[k], k) for k in good)
    for key, (kind, _) in bad.items():  # each skip is logged with its key, shard and kind
        assert any(f"'{key}'" in r.message and os.path.basename(shard_of[key]) in r.message and f"({kind})" in r.message
                   for r in caplog.records), key

    # a short run: it completes, and the checkpoint's counters hold every bad sample by kind
    steps = math.ceil(len(good) / 4) + 1  # past the end of epoch 0
    recipe = load_recipe(os.path.join(REPO, "recipes", "vision", "tiny.yaml"), [
        f"data.train_shards={spec}", f"train.max_steps={steps}", "train.global_batch_size=4", "train.micro_batch_size=4",
        "data.max_bad_fraction=0.9", "train.precision=fp32", f"checkpoint.dir={tmp_path}/ckpt", "tracking.enabled=false"])
    with pytest.warns(UserWarning, match="no index"):
        result = run(recipe)
    assert result.step == steps
    state = torch.load(result.checkpoint / "train_state_rank0.pt", weights_only=True)
    epoch0 = DataCounters.merge(DataCounters(c) for c in state["data"]["counters"]).totals(epoch=0)
    assert {k: v for k, v in epoch0.items() if v and k != "items"} == {
        **expected, "good": len(good), "read": len(good) + len(bad)}
