"""Webdataset tar shards: sample encoders, a shard writer and shard-spec expansion.

Sample formats (one webdataset sample = the tar members ``<key>.<ext>``; keys carry no dots):

* speech: ``flac`` (soundfile FLAC, PCM_16, mono, 16 kHz by default) + ``json``
  ``{"num_samples": n, "sample_rate": sr}`` + optional ``cls`` (decimal int label)
* vision: ``png`` or ``jpg`` (encoded image bytes, stored as given) + optional ``cls``
* text: ``ids`` (token ids as int32 little-endian raw bytes, one document, no BOS/EOS) +
  ``json`` ``{"num_tokens": n}`` + optional ``cls``

Tar files are written by webdataset's ``ShardWriter`` with a fixed mtime, so the same samples
give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Iterable, Optional

import numpy as np


@contextlib.contextmanager
def quiet_tv_io():
    """torchvision 0.29 deprecates torchvision.io's image codecs in favour of TorchCodec (not in
    the environment); the calls still work. This context silences that per-call warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        yield

__all__ = [
    "encode_speech_sample",
    "encode_vision_sample",
    "encode_text_sample",
    "write_shards",
    "expand_shards",
]


def _check_key(key: str) -> str:
    key = str(key)
    if not key or "." in key or "/" in key:
        # webdataset splits a member name at the first dot of its basename (FAQ, issue #237).
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    return key


def _label_bytes(label: Optional[int]) -> dict:
    return {} if label is None else {"cls": str(int(label)).encode()}


def encode_speech_sample(key: str, audio: np.ndarray, sample_rate: int = 16000, label: Optional[int] = None) -> dict:
    """A speech sample: mono float audio in [-1, 1] -> FLAC (PCM_16) bytes + json metadata."""
    import soundfile as sf

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"speech sample {key!r}: expected mono 1-D audio, got shape {audio.shape}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), int(sample_rate), format="FLAC", subtype="PCM_16")
    meta = {"num_samples": int(audio.shape[0]), "sample_rate": int(sample_rate)}
    return {"__key__": _check_key(key), "flac": buf.getvalue(), "json": json.dumps(meta).encode(), **_label_bytes(label)}


def encode_vision_sample(key: str, image, label: Optional[int] = None, fmt: str = "png") -> dict:
    """A vision sample: ``image`` is encoded bytes (stored as given, ``fmt`` names them: png/jpg)
    or a uint8 tensor/array ``[C,H,W]`` (or ``[H,W]``) that is encoded here as PNG (or JPEG)."""
    fmt = fmt.lower()
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise ValueError(f"vision sample {key!r}: format must be png or jpg, got {fmt!r}")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        import torch
        import torchvision.io as tvio

        t = torch.as_tensor(np.asarray(image))
        if t.dtype != torch.uint8:
            raise ValueError(f"vision sample {key!r}: pixel arrays must be uint8, got {t.dtype}")
        if t.ndim == 2:
            t = t[None]
        t = t.contiguous()
        with quiet_tv_io():
            image = (tvio.encode_png(t) if fmt == "png" else tvio.encode_jpeg(t, quality=95)).numpy().tobytes()
    return {"__key__": _check_key(key), fmt: bytes(image), **_label_bytes(label)}


def encode_text_sample(key: str, ids, label: Optional[int] = None) -> dict:
    """A text sample: one document's token ids (no BOS/EOS) as int32 little-endian bytes."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"text sample {key!r}: ids must be a 1-D integer array")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"text sample {key!r}: ids out of int32 range")
    data = arr.astype("<i4").tobytes()
    meta = {"num_tokens": int(arr.shape[0])}
    return {"__key__": _check_key(key), "ids": data, "json": json.dumps(meta).encode(), **_label_bytes(label)}


def write_shards(out_dir: str, samples: Iterable[dict], *, prefix: str = "train", samples_per_shard: int = 1000) -> str:
    """Write encoded samples (see ``encode_*_sample``) to ``out_dir/<prefix>-NNNNNN.tar``.

    Returns the shard spec as a brace pattern, e.g. ``out_dir/train-{000000..000003}.tar``
    (a single shard is returned as its plain path). Raises ValueError if there are no samples.
    """
    import webdataset as wds

    if samples_per_shard <= 0:
        raise ValueError("samples_per_shard must be positive")
    if "." in prefix or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} must contain no '.' or '/'")
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    written = 0
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=0.0) as sink:
        for s in samples:
            for k, v in s.items():
                if k != "__key__" and not isinstance(v, (bytes, bytearray)):
                    raise ValueError(f"sample {s.get('__key__')!r}: field {k!r} must be bytes (use encode_*_sample)")
            sink.write({**s, "__key__": _check_key(s["__key__"])})
            written += 1
        num_shards = sink.shard  # ShardWriter.shard is the index of the next shard to open
    if written == 0:
        os.remove(pattern % 0)
        raise ValueError(f"write_shards({out_dir!r}): no samples to write")
    if num_shards == 1:
        return pattern % 0
    return os.path.join(out_dir, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a webdataset brace pattern (``dir/train-{000000..000009}.tar``) or a
    comma-separated list of paths/patterns. Raises ValueError naming the first missing file."""
    from braceexpand import braceexpand

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty shard spec")
    if spec.strip() == "synthetic":
        raise ValueError("'synthetic' is not a shard spec (the loader handles it itself)")
    paths: list[str] = []
    depth = 0
    part = []
    # Split at commas outside braces, so "a-{0..3}.tar,b-{x,y}.tar" works.
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            paths.extend(braceexpand("".join(part).strip()))
            part = []
        else:
            part.append(ch)
    paths.extend(braceexpand("".join(part).strip()))
    paths = [os.path.expanduser(p) for p in paths if p]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no files")
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"shard file not found: {p} (from spec {spec!r})")
    return paths
