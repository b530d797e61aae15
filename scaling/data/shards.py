"""Webdataset tar shards: sample encoders, a shard writer, the shard-set index, and shard-spec expansion.

Sample formats (one webdataset sample = the tar members ``<key>.<ext>``; keys carry no dots):

* speech: ``flac`` (soundfile FLAC, PCM_16, mono, 16 kHz by default) + ``json``
  ``{"num_samples": n, "sample_rate": sr}`` + optional ``cls`` (decimal int label)
* vision: ``png``, ``jpg`` or ``webp`` (encoded image bytes, stored as given) + optional ``cls``
* text: ``ids`` (token ids as int32 little-endian raw bytes, one document, no BOS/EOS) +
  ``json`` ``{"num_tokens": n}`` + optional ``cls``

Tar files are written by webdataset's ``TarWriter`` (one per shard) with a fixed mtime, so the same samples
give byte-identical shards.

Index. Every shard set ``<dir>/<prefix>-NNNNNN.tar`` gets ``<dir>/<prefix>.index.json`` (written
last, atomically) with the format version, the modality, every shard's name, sample count and
byte size, and for text the tokenizer's identity (sha256 of the sentencepiece model file, its
vocabulary size and special ids). :func:`check_shard_set` (called by the loader at start) refuses
shards that are not listed in their index, whose size differs from it, whose modality is not the
model's, or (text) that were made with another tokenizer. Shards without an index still load,
with a warning.

Remote shards. A shard spec may also be anything webdataset's ``gopen`` opens as a stream:
``pipe:<command>`` (the command's stdout is the tar) or an ``http(s)://`` URL (read through
``curl``, as webdataset does), brace patterns of either. A remote shard's *name* is the last
``*.tar`` word of its spec (``pipe:curl -s http://h/d/train-000003.tar | cat`` is
``train-000003.tar``), so sample ids, the shuffle and the resume state are the same as for a
local copy of the set. Its index is the same spec with the shard name replaced by
``<prefix>.index.json`` (``pipe:cat d/train.index.json``, ``http://h/d/train.index.json``) and is
read through ``gopen`` too. Remote shards must have a reachable index: a stream cannot be counted
without reading all of it, and the slots' partition needs every count before the first sample.
Their existence and byte sizes are not checked at start (that would cost a request per shard); a
shard that cannot be read is found when it is read, like a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from typing import Any, Iterable, Optional

import numpy as np


def ignore_warning(category: type[Warning], message: str = "") -> None:
    """Add an "ignore" filter for ``category`` (and ``message``, a regex of its start) unless one is
    there. Per image, a ``catch_warnings`` (as before) or a new filter would reset the warning registry
    every time, and every "once" warning of the process would print again per image (40 copies of
    FSDP's view-tensor warning in a 20-step run); a filter already present costs a scan of the list."""
    for action, msg, cat, module, lineno in warnings.filters:
        if action == "ignore" and cat is category and (msg.pattern if msg else "") == message and not module:
            return
    warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def quiet_tv_io():
    """torchvision 0.29 deprecates torchvision.io's image codecs in favour of TorchCodec (not in
    the environment); the calls still work. Inside this context that per-call warning is silenced."""
    ignore_warning(DeprecationWarning, "The image decoding and encoding capabilities of TorchVision")
    yield

__all__ = [
    "encode_speech_sample",
    "encode_vision_sample",
    "encode_text_sample",
    "write_shards",
    "write_shard_set",
    "expand_shards",
    "index_path",
    "index_path_of_shard",
    "is_remote",
    "shard_name",
    "read_index",
    "check_shard_set",
    "file_sha256",
    "tokenizer_identity",
    "INDEX_FORMAT",
    "INDEX_VERSION",
]

INDEX_FORMAT = "scaling-shards"
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
_SHARD_NAME = re.compile(r"(?P<prefix>[^/]+)-(?P<num>\d+)\.tar")


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
    """A vision sample: ``image`` is encoded bytes (stored as given, ``fmt`` names them: png/jpg/webp)
    or a uint8 tensor/array ``[C,H,W]`` (or ``[H,W]``) that is encoded here as PNG (or JPEG)."""
    fmt = fmt.lower()
    if fmt == "jpeg":
        fmt = "jpg"
    is_bytes = isinstance(image, (bytes, bytearray, memoryview))
    if fmt not in (("png", "jpg", "webp") if is_bytes else ("png", "jpg")):
        raise ValueError(f"vision sample {key!r}: format must be png or jpg (or webp for encoded bytes), got {fmt!r}")
    if not is_bytes:
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


_TAR_BLOCK, _TAR_RECORD = 512, 10240


def _tar_round(n: int, unit: int = _TAR_BLOCK) -> int:
    return -(-int(n) // unit) * unit


def _modality_of(sample: dict) -> str:
    if "ids" in sample:
        return "text"
    if "flac" in sample or "wav" in sample:
        return "speech"
    if any(k in sample for k in ("png", "jpg", "jpeg", "webp")):
        return "vision"
    raise ValueError(f"sample {sample.get('__key__')!r}: no ids/flac/wav/png/jpg/webp member, cannot tell its modality")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(path: str) -> dict:
    """What a text index records about a sentencepiece model: its file's sha256 (the identity the
    loader compares), vocabulary size and special ids (``None`` where the model has none)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    mask = sp.piece_to_id("<mask>")
    return {
        "sha256": file_sha256(path),
        "file": os.path.basename(path),
        "vocab_size": int(sp.get_piece_size()),
        "bos_id": int(sp.bos_id()),
        "pad_id": int(sp.pad_id()),
        "eos_id": int(sp.eos_id()),
        "unk_id": int(sp.unk_id()),
        "mask_id": int(mask) if sp.id_to_piece(mask) == "<mask>" else None,
    }


def index_path(out_dir: str, prefix: str = "train") -> str:
    """The index of the shard set ``out_dir/<prefix>-NNNNNN.tar``: ``out_dir/<prefix>.index.json``."""
    return os.path.join(out_dir, prefix + INDEX_SUFFIX)


_REMOTE_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_REMOTE_TAR_NAME = re.compile(r"[^/\s'\"|;&<>]+\.tar(?![\w.-])")


def is_remote(shard: str) -> bool:
    """Whether a shard spec is a stream for webdataset's ``gopen`` (``pipe:...``, ``http(s)://...``)
    rather than a local path (``file://`` URLs count as local files for gopen, but are not accepted here)."""
    return shard.startswith("pipe:") or (_REMOTE_SCHEME.match(shard) is not None and not shard.startswith("file:"))


def shard_name(shard: str) -> str:
    """The shard's file name, which sample ids and the index use: the basename of a local path; for a
    remote spec the last ``*.tar`` word in it (else the basename of its URL path)."""
    if not is_remote(shard):
        return os.path.basename(shard)
    names = _REMOTE_TAR_NAME.findall(shard)
    if names:
        return names[-1]
    from urllib.parse import urlparse

    return os.path.basename(urlparse(shard).path) or shard


def index_path_of_shard(shard_path: str) -> Optional[str]:
    """Where the index of a shard named ``<prefix>-NNNNNN.tar`` lives (None for other names). For a
    remote spec: the same spec with that name replaced by ``<prefix>.index.json``."""
    name = shard_name(shard_path)
    m = _SHARD_NAME.fullmatch(name)
    if m is None:
        return None
    if not is_remote(shard_path):
        return index_path(os.path.dirname(shard_path), m["prefix"])
    at = shard_path.rfind(name)
    return shard_path[:at] + m["prefix"] + INDEX_SUFFIX + shard_path[at + len(name):]


def _spec_of(names: list[str], prefix: str) -> str:
    if len(names) == 1:
        return names[0]
    return f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar"


def write_shard_set(out_dir: str, samples: Iterable[dict], *, prefix: str = "train",
                    samples_per_shard: Optional[int] = 1000, shard_bytes: Optional[float] = None,
                    modality: Optional[str] = None, tokenizer: Optional[str] = None,
                    extra: Optional[dict] = None) -> dict:
    """Write encoded samples (see ``encode_*_sample``) to ``out_dir/<prefix>-NNNNNN.tar`` and the
    set's index ``out_dir/<prefix>.index.json``; returns the index (plus ``"index_path"``).

    A shard holds at most ``samples_per_shard`` samples and ``shard_bytes`` bytes of tar file (a
    sample bigger than that gets a shard of its own); ``None`` means no limit of that kind.
    ``modality`` defaults to what the first sample's members say (all samples must agree).
    ``tokenizer`` (text): the sentencepiece model the ids came from; the index records its
    identity. ``extra``: more JSON fields for the index (sample rate, class names...).
    Raises ValueError if there are no samples.
    """
    import webdataset as wds

    if samples_per_shard is not None and samples_per_shard <= 0:
        raise ValueError("samples_per_shard must be positive")
    if not prefix or "." in prefix or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} must be non-empty and contain no '.' or '/'")
    if modality is not None and modality not in ("speech", "vision", "text"):
        raise ValueError(f"modality must be speech, vision or text, got {modality!r}")
    tok = tokenizer_identity(tokenizer) if tokenizer else None
    os.makedirs(out_dir, exist_ok=True)
    if shard_bytes is not None and shard_bytes < _TAR_RECORD:
        raise ValueError(f"shard_bytes must be at least {_TAR_RECORD} (one tar record)")
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    counts: dict[str, int] = {}
    sink, path, offset = None, "", 0
    try:
        for s in samples:
            for k, v in s.items():
                if k != "__key__" and not isinstance(v, (bytes, bytearray)):
                    raise ValueError(f"sample {s.get('__key__')!r}: field {k!r} must be bytes (use encode_*_sample)")
            m = _modality_of(s)
            if modality is None:
                modality = m
            elif m != modality:
                raise ValueError(f"sample {s.get('__key__')!r} is {m}, but this shard set is {modality}")
            key = _check_key(s["__key__"])
            # The real tar bytes: this sample's members (each with a pax header, as webdataset's
            # TarWriter writes them) after the shard's current offset, plus the end-of-archive
            # blocks padded to a 10240-byte record. A shard is closed before it would pass shard_bytes.
            grown = offset + sum(_TAR_BLOCK * 3 + _tar_round(len(v)) for k, v in s.items() if k != "__key__")
            full = sink is not None and (
                (samples_per_shard is not None and counts[path] >= samples_per_shard)
                or (shard_bytes is not None and _tar_round(grown + 2 * _TAR_BLOCK, _TAR_RECORD) > shard_bytes)
            )
            if sink is None or full:
                if sink is not None:
                    sink.close()
                path = pattern % len(counts)
                sink = wds.TarWriter(path, encoder=False, mtime=0.0)
                counts[path] = 0
            sink.write({**s, "__key__": key})
            counts[path] += 1
            offset = sink.tarstream.offset
    finally:
        if sink is not None:
            sink.close()
    if not counts:
        raise ValueError(f"write_shards({out_dir!r}): no samples to write")
    tok_fields = {"tokenizer": tok} if tok is not None else {}
    shards = [{"name": os.path.basename(p), "num_samples": int(n), "num_bytes": os.path.getsize(p)}
              for p, n in counts.items()]
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "modality": modality,
        "prefix": prefix,
        "spec": _spec_of([s["name"] for s in shards], prefix),
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_bytes": sum(s["num_bytes"] for s in shards),
        **tok_fields,
        **(extra or {}),
        "shards": shards,
    }
    path = index_path(out_dir, prefix)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return {**index, "index_path": path}


def write_shards(out_dir: str, samples: Iterable[dict], *, prefix: str = "train", samples_per_shard: Optional[int] = 1000,
                 shard_bytes: Optional[float] = None, modality: Optional[str] = None,
                 tokenizer: Optional[str] = None, extra: Optional[dict] = None) -> str:
    """:func:`write_shard_set` returning the shard spec as a brace pattern, e.g.
    ``out_dir/train-{000000..000003}.tar`` (a single shard is returned as its plain path)."""
    index = write_shard_set(out_dir, samples, prefix=prefix, samples_per_shard=samples_per_shard,
                            shard_bytes=shard_bytes, modality=modality, tokenizer=tokenizer, extra=extra)
    return os.path.join(out_dir, index["spec"])


def read_index(path: str) -> dict:
    """A shard-set index; ValueError naming the file if it is not one this code can read."""
    try:
        if is_remote(path):
            from webdataset.gopen import gopen

            with gopen(path, "rb") as f:  # a Pipe: raises OSError when the command/curl fails
                index = json.loads(f.read())
        else:
            with open(path) as f:
                index = json.load(f)
    except (OSError, ValueError) as exn:
        raise ValueError(f"shard index {path} cannot be read: {exn}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"shard index {path} is not a {INDEX_FORMAT} index (no 'format'/'shards')")
    version = index.get("format_version")
    if not isinstance(version, int) or version > INDEX_VERSION:
        raise ValueError(f"shard index {path} has format_version {version!r}; this code reads up to {INDEX_VERSION}")
    return index


def check_shard_set(paths: list[str], *, modality: str, tokenizer: Optional[str] = None,
                    vocab_size: Optional[int] = None, pad_id: Optional[int] = None,
                    mask_id: Optional[int] = None) -> list[Optional[int]]:
    """Checks shards against their indexes before any training (cheap: JSON files and ``stat``).

    ValueError, naming the files, when a shard does not exist, is not listed in its index or
    is bigger than the index says (rewritten after it), when an index's modality is not ``modality``, or
    (text) when the index's tokenizer is not ``tokenizer`` (sha256 of the file), has more ids
    than ``vocab_size`` or other pad/mask ids. A shard smaller than its index says is truncated:
    a warning, and the loader reads it up to the cut (the rest counts as ``truncated_lost``).
    Shards without an index are accepted with one warning. Returns each shard's sample count from its index (None for a shard without one).
    """
    indexes: dict[str, Optional[dict]] = {}
    unindexed: list[str] = []
    counts: list[Optional[int]] = []
    for p in paths:
        remote = is_remote(p)
        if not remote and not os.path.isfile(p):
            raise ValueError(f"shard file not found: {p}")
        ip = index_path_of_shard(p)
        if remote and ip is None:
            raise ValueError(f"remote shard {p}: its name {shard_name(p)!r} is not <prefix>-NNNNNN.tar, so it has no "
                             "index to take its sample count from; remote shards need their set's index")
        if not remote and (ip is None or not os.path.isfile(ip)):
            unindexed.append(p)
            counts.append(None)
            continue
        if ip not in indexes:
            try:
                indexes[ip] = read_index(ip)
            except ValueError as exn:
                if not remote:
                    raise
                raise ValueError(f"remote shard {p}: no readable index at {ip} ({exn}); remote shards need their "
                                 "set's <prefix>.index.json beside them (a stream cannot be counted without "
                                 "reading all of it)") from None
        index = indexes[ip]
        entry = next((e for e in index["shards"] if e.get("name") == shard_name(p)), None)
        if entry is None:
            raise ValueError(f"shard {p} is not listed in its index {ip} (which lists {index.get('spec', '?')}): "
                             "a stale or foreign file; rebuild the shard set or leave it out of data.train_shards")
        if remote:  # sizes are not checked: that would cost a request per shard
            counts.append(int(entry["num_samples"]))
            continue
        size = os.path.getsize(p)
        indexed_size = entry.get("num_bytes")
        if indexed_size is not None and size > int(indexed_size):
            raise ValueError(f"shard {p} has {size} bytes but its index {ip} says {indexed_size}: "
                             "the shard was rewritten after the index was written; rebuild the shard set")
        if indexed_size is not None and size < int(indexed_size):
            warnings.warn(f"shard {p} has {size} bytes but its index {ip} says {indexed_size}: it is truncated; "
                          "its samples after the cut are skipped and counted as truncated_lost")
        counts.append(int(entry["num_samples"]))
    if unindexed:
        warnings.warn(f"{len(unindexed)} of {len(paths)} shards have no index (e.g. {unindexed[0]}; expected "
                      f"{index_path_of_shard(unindexed[0]) or '<prefix>.index.json next to <prefix>-NNNNNN.tar'}), "
                      "written by older code? Their sample counts and tokenizer are not checked")
    tok_sha = None
    for ip, index in indexes.items():
        if index.get("modality") != modality:
            raise ValueError(f"shard index {ip} says the shards are {index.get('modality')!r}, "
                             f"but the model's modality is {modality!r}")
        rec = index.get("tokenizer")
        if modality != "text" or not rec:
            continue
        if not tokenizer:
            warnings.warn(f"data.text.tokenizer is not set: cannot check that the shards of {ip} were made with "
                          f"the tokenizer they record ({rec.get('file')}, sha256 {rec.get('sha256')})")
        else:
            if not os.path.isfile(tokenizer):
                raise ValueError(f"data.text.tokenizer {tokenizer} not found")
            tok_sha = tok_sha or file_sha256(tokenizer)
            if rec.get("sha256") != tok_sha:
                raise ValueError(f"the shards of {ip} were made with tokenizer {rec.get('file')} (sha256 {rec.get('sha256')}), "
                                 f"but data.text.tokenizer is {tokenizer} (sha256 {tok_sha}): a different tokenizer")
        if vocab_size is not None and rec.get("vocab_size") is not None and int(rec["vocab_size"]) > vocab_size:
            raise ValueError(f"the tokenizer of {ip} ({rec.get('file')}) has {rec['vocab_size']} ids, "
                             f"more than model.text.vocab_size ({vocab_size})")
        for name, want in (("pad_id", pad_id), ("mask_id", mask_id)):
            got = rec.get(name)
            if want is not None and got is not None and got >= 0 and int(got) != want:
                raise ValueError(f"the tokenizer of {ip} ({rec.get('file')}) has {name} {got}, "
                                 f"but model.text.{name} is {want}")
    return counts


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a webdataset brace pattern (``dir/train-{000000..000009}.tar``) or a
    comma-separated list of paths/patterns. Raises ValueError naming the first missing local file;
    remote specs (:func:`is_remote`: ``pipe:``, ``http(s)://``) are expanded but not checked here."""
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
    paths = [p if is_remote(p) else os.path.expanduser(p) for p in paths if p]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no files")
    for p in paths:
        if not is_remote(p) and not os.path.isfile(p):
            raise ValueError(f"shard file not found: {p} (from spec {spec!r})")
    return paths
