"""Shard tools: raw images, audio and text -> indexed webdataset shard sets; sentencepiece tokenizers.

Console scripts (thin files ``tools/shards.py`` and ``tools/tokenizer.py``):

* ``scaling-shards image SRC OUT``: SRC is an image folder tree (``--labels auto``: when every
  image lies in a sub-folder of SRC, the sub-folder names, sorted, become labels 0..C-1, as
  torchvision's ImageFolder) or a list file (``path[<TAB>label]`` per line, relative to the list
  file). The encoded bytes are stored as they are (png/jpg/webp; each file is decoded once to
  check it), or re-encoded with ``--reencode png|jpg``.
* ``scaling-shards audio SRC OUT``: SRC is a folder of wav/flac (``--ext``) or a tsv manifest
  (fairseq's: an optional first line with the root folder, then ``path[<TAB>frames[<TAB>label]]``).
  Decoded with soundfile, mixed down to mono, resampled with soxr to ``--sample-rate`` (16 kHz)
  when needed, stored as FLAC (PCM_16) plus the sample count.
* ``scaling-shards text SRC OUT --tokenizer MODEL``: SRC is a text file or a folder of them
  (``--ext``); one document per file or per line (``--doc``; default per line for a file, per file
  for a folder); UTF-8; stores the sentencepiece ids (no BOS/EOS) and records the tokenizer's
  identity in the index.
* ``scaling-tokenizer train TEXT... OUT --vocab-size N``: a sentencepiece model with the project's
  special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4), trained on the
  non-empty lines of the TEXT files/folders; ``scaling-tokenizer info MODEL`` prints its identity.

Every shard set ``OUT/<prefix>-NNNNNN.tar`` gets ``OUT/<prefix>.index.json`` (see
:mod:`scaling.data.shards`). Inputs are shuffled once (``--seed``; ``--no-shuffle`` keeps the sorted
order) so that shards do not hold one class each; the same inputs and options give byte-identical
shards and index, with any ``--workers``. A bad input (unreadable, undecodable, empty, too large) is
skipped and listed in the summary, and the skips are counted by reason there and in the index
(``"skipped": {reason: n}``); one file never stops the build. Inputs are converted as the loader
converts them (:func:`scaling.modalities.vision.decode_image_bytes`, :func:`scaling.modalities.speech.decode_audio`):
an image's first frame, 8 bits; audio mixed to mono and resampled.

Folders are walked once per real folder, inside SRC: a symlink is followed only when its target lies
inside SRC (its real path) and was not read yet, so a link out of SRC, a dangling one or a loop
(``loop -> ..``) is skipped and counted as ``symlink``; a file reached twice is read once. Class labels
come from the real path relative to SRC.
"""

from __future__ import annotations

import argparse
import codecs
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from scaling.config import SpeechDataConfig, VisionDataConfig
from scaling.data.quality import BadSample, short_error
from scaling.data.shards import (
    _SHARD_NAME,
    INDEX_SUFFIX,
    encode_speech_sample,
    encode_text_sample,
    encode_vision_sample,
    quiet_tv_io,
    tokenizer_identity,
    write_shard_set,
)

__all__ = [
    "SPECIAL_PIECES",
    "train_tokenizer",
    "build_image_shards",
    "build_audio_shards",
    "build_text_shards",
    "BuildReport",
    "shards_main",
    "tokenizer_main",
]

# fairseq/RoBERTa special ids, as the loader (scaling.data.collate) and TextModelConfig expect them.
SPECIAL_PIECES = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
DEFAULT_SHARD_MB = 256.0
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic")
STORED_IMAGE_FORMATS = ("png", "jpg", "webp")  # what the loader decodes (scaling.data.collate)
MAX_LISTED_SKIPS = 20
# Why an input is skipped (the summary and the index count them): the loader's bad-sample kinds that a
# file can have (decode_error, empty, too_large, non_finite, bad_label), and the build's own.
BUILD_SKIP_REASONS = ("unreadable", "decode_error", "empty", "too_large", "non_finite", "bad_label", "unsupported_format",
                      "not_utf8", "no_tokens", "no_class_folder", "symlink", "error")


# ============================================================================= tokenizer
def train_tokenizer(sentences: Iterable[str], model_prefix: str, vocab_size: int, *, model_type: str = "unigram",
                    input_sentence_size: int = 100_000, character_coverage: float = 0.9995,
                    max_sentence_length: int = 8192, seed: int = 1234, num_threads: int = 1) -> str:
    """Trains a sentencepiece model with the project's special ids (:data:`SPECIAL_PIECES`) on
    ``sentences``; writes ``<model_prefix>.model`` / ``.vocab`` and returns the ``.model`` path.

    ``input_sentence_size`` sentences are sampled (seeded) when there are more; the vocabulary
    may come out smaller than ``vocab_size`` on little text (``hard_vocab_limit=False``)."""
    import sentencepiece as spm

    parent = os.path.dirname(model_prefix)
    if parent:
        os.makedirs(parent, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        bos_id=SPECIAL_PIECES["<s>"],
        pad_id=SPECIAL_PIECES["<pad>"],
        eos_id=SPECIAL_PIECES["</s>"],
        unk_id=SPECIAL_PIECES["<unk>"],
        user_defined_symbols=["<mask>"],
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    path = model_prefix + ".model"
    sp = spm.SentencePieceProcessor(model_file=path)
    got = {p: sp.piece_to_id(p) for p in SPECIAL_PIECES}
    if got != SPECIAL_PIECES:
        raise RuntimeError(f"tokenizer {path}: special ids {got} != {SPECIAL_PIECES}")
    return path


def _check_project_tokenizer(path: str) -> dict:
    ident = tokenizer_identity(path)
    want = {"bos_id": 0, "pad_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    got = {k: ident[k] for k in want}
    if got != want:
        raise ValueError(f"tokenizer {path} has special ids {got}, but the loader needs {want} "
                         "(train one with scaling-tokenizer)")
    return ident


# ============================================================================= reporting
def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class BuildReport:
    """What a build did: printed as the tool's summary."""

    tool: str
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    spec: str = ""
    index_path: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    skip_counts: dict[str, int] = field(default_factory=dict)  # reason kind (BUILD_SKIP_REASONS) -> inputs
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def skip(self, path: str, kind: str, reason: str) -> None:
        assert kind in BUILD_SKIP_REASONS, kind
        self.skipped.append((path, reason))
        self.skip_counts[kind] = self.skip_counts.get(kind, 0) + 1

    def summary(self) -> str:
        head = (f"{self.tool}: {self.samples} samples written in {self.shards} shard{'s' * (self.shards != 1)} "
                f"({_human_bytes(self.bytes)})")
        if self.spec:
            head += f" -> {self.spec} (index {self.index_path})"
        head += f"; {len(self.skipped)} input{'s' * (len(self.skipped) != 1)} skipped"
        if self.skip_counts:
            head += " (" + ", ".join(f"{k} {n}" for k, n in sorted(self.skip_counts.items())) + ")"
        lines = [head]
        lines += [f"  note: {n}" for n in self.notes]
        for path, reason in self.skipped[:MAX_LISTED_SKIPS]:
            lines.append(f"  skipped {path}: {reason}")
        if len(self.skipped) > MAX_LISTED_SKIPS:
            lines.append(f"  ... and {len(self.skipped) - MAX_LISTED_SKIPS} more skipped inputs")
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


def _progress(total: Optional[int], desc: str, enabled: bool, unit: str = "file"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0.5, dynamic_ncols=True,
                file=sys.stderr)


_short = short_error


# ============================================================================= inputs
@dataclass
class _Input:
    path: str
    label: Optional[int] = None


def _ext(path: str) -> str:
    base = os.path.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: str, exts: tuple[str, ...], report: BuildReport) -> tuple[list[tuple[str, str]], int]:
    """``(path, real path)`` of the files under ``root`` with one of ``exts`` (hidden files and folders
    left out), in sorted top-down order, and how many other files there were.

    Each real folder is read once and each real file listed once. A symlink is followed only when its
    target's real path lies inside ``root`` (and, for a folder, was not read yet): a link out of the
    source, a dangling link or a loop back into a folder already read is skipped and counted as
    ``symlink`` (``os.walk(followlinks=True)`` would write ``loop -> ..`` samples over and over, with
    the labels of the wrong folder). Fifos, sockets and devices are not read."""
    root_real = os.path.realpath(root)
    found: list[tuple[str, str]] = []
    seen_files: set[str] = set()
    seen_dirs = {root_real}
    ignored = 0
    stack = [root]  # a stack, not recursion: a tree thousands of folders deep is still walked
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exn:
            report.skip(folder, "unreadable", f"cannot list folder: {exn.strerror or _short(exn)}")
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            real = os.path.realpath(e.path)
            if e.is_symlink():
                if not os.path.exists(real):
                    report.skip(e.path, "symlink", "dangling symlink")
                    continue
                if not _inside(real, root_real):
                    report.skip(e.path, "symlink", f"symlink to {real}, outside the source {root_real}")
                    continue
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow the link
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if real in seen_dirs:
                    if e.is_symlink():  # (a real folder read before through a link is no skip: it was read)
                        report.skip(e.path, "symlink", f"symlink to {real}, a folder already read (or a loop)")
                    continue
                seen_dirs.add(real)
                subdirs.append(e.path)
            elif not is_file or _ext(e.name) not in exts:
                ignored += 1
            elif real in seen_files:
                if e.is_symlink():
                    report.skip(e.path, "symlink", f"symlink to {real}, a file already read")
            else:
                seen_files.add(real)
                found.append((e.path, real))
        stack.extend(reversed(subdirs))  # the first sub-folder is read next, as os.walk does
    return found, ignored


def _scan_folder(root: str, exts: tuple[str, ...], labels: str, report: BuildReport) -> tuple[list[_Input], Optional[list[str]]]:
    """Inputs of a folder tree; with ``labels`` folders (or auto, when every file is in a
    sub-folder) the first-level sub-folder names of the files' real paths, sorted, are the classes."""
    found, ignored = _walk(root, exts, report)
    if ignored:
        report.notes.append(f"{ignored} files under {root} without a {'/'.join(exts)} extension were not read")
    root_real = os.path.realpath(root)
    files = [f for f, _ in found]
    rel = [os.path.relpath(real, root_real) for _, real in found]
    in_sub = [os.sep in r for r in rel]
    use_folders = labels == "folders" or (labels == "auto" and files and all(in_sub))
    if not use_folders:
        return [_Input(f) for f in files], None
    classes = sorted({r.split(os.sep, 1)[0] for r, s in zip(rel, in_sub) if s})
    lookup = {c: i for i, c in enumerate(classes)}
    out = []
    for f, r, s in zip(files, rel, in_sub):
        if s:
            out.append(_Input(f, lookup[r.split(os.sep, 1)[0]]))
        else:
            report.skip(f, "no_class_folder", "not inside a class sub-folder (--labels folders)")
    return out, classes


def _read_list(path: str, label_column: int, fairseq_root: bool, report: BuildReport) -> list[_Input]:
    """A list file: ``path[<TAB>col...]`` per line; the label (an int) is column ``label_column``.
    Without tabs, a trailing whitespace-separated integer is column 1. With ``fairseq_root``, a
    first line naming a folder is the root of relative paths (wav2vec manifests)."""
    base = os.path.dirname(os.path.abspath(path))
    out: list[_Input] = []
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    first = True
    for lineno, raw in enumerate(raw_lines, 1):
        try:  # one line that is not UTF-8 costs only itself
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exn:
            report.skip(f"{path}:{lineno}", "not_utf8", f"not UTF-8 text (bad byte at offset {exn.start})")
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if first and fairseq_root and "\t" not in line:
            root = text if os.path.isabs(text) else os.path.join(base, text)
            if os.path.isdir(root):
                base, first = root, False
                continue
        first = False
        if "\t" in line:
            cols = [c.strip() for c in line.split("\t")]
        else:
            parts = text.rsplit(None, 1)
            cols = parts if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]) else [text]
        p = cols[0] if os.path.isabs(cols[0]) else os.path.join(base, cols[0])
        label = None
        if len(cols) > label_column and cols[label_column]:
            if not re.fullmatch(r"-?\d+", cols[label_column]):
                report.skip(f"{path}:{lineno}", "bad_label", f"label {cols[label_column]!r} is not an integer")
                continue
            label = int(cols[label_column])
            if not 0 <= label < 2**63:  # what the loader takes (scaling.data.collate)
                report.skip(f"{path}:{lineno}", "bad_label", f"label {label} is not in [0, 2^63)")
                continue
        out.append(_Input(p, label))
    return out


def _order(inputs: list, shuffle: bool, seed: int) -> list:
    if not shuffle:
        return list(inputs)
    perm = np.random.default_rng(seed).permutation(len(inputs))
    return [inputs[i] for i in perm]


def _folder_or_list(src: str, exts: tuple[str, ...], labels: str, report: BuildReport, opts, *, label_column: int,
                    fairseq_root: bool) -> tuple[list, Optional[list[str]]]:
    """Inputs from a folder tree (classes from sub-folders) or a list file, in write order."""
    if os.path.isdir(src):
        inputs, classes = _scan_folder(src, exts, labels, report)
    else:
        inputs, classes = _read_list(src, label_column, fairseq_root, report), None
    return _order(inputs, opts.shuffle, opts.seed), classes


def _key(i: int, path: str, suffix: str = "") -> str:
    """A webdataset key (no dots or slashes): running number + the file's name, for tracing."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48]
    return f"{i:09d}" + (f"_{stem}" if stem else "") + suffix


def _ordered_map(fn: Callable, jobs: list, workers: int) -> Iterator:
    """``map(fn, jobs)`` in order; with ``workers > 1`` in a process pool (forkserver: the parent
    may hold torch's threads), a window of jobs at a time so results never pile up in memory."""
    if workers <= 1:
        for j in jobs:
            yield fn(j)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    window = workers * 64
    with ctx.Pool(workers) as pool:
        for start in range(0, len(jobs), window):
            yield from pool.imap(fn, jobs[start : start + window], chunksize=4)


@dataclass
class _Options:
    out: str
    prefix: str = "train"
    shard_mb: Optional[float] = DEFAULT_SHARD_MB
    samples_per_shard: Optional[int] = None
    shuffle: bool = True
    seed: int = 0
    workers: int = 1
    progress: bool = True


def _guarded(job: Callable, args: tuple):
    """``job(args)``, with any exception it lets out turned into a skip of kind ``error`` (naming the
    exception's type): the jobs turn every codec error into a skip of its own kind, so this is for
    what nobody foresaw, and one file never ends the build (nor a worker pool)."""
    try:
        return job(args)
    except Exception as exn:
        return None, ("error", f"unexpected {type(exn).__name__}: {_short(exn)}")


def _decoded(inputs, job, jobs, what: str, opts, report):
    """(index, input, result) for every input whose job succeeded, in input order, with a progress
    bar; failures go to the report's skipped list with their reason kind and reason."""
    with _progress(len(jobs), what, opts.progress) as bar:
        results = _ordered_map(functools.partial(_guarded, job), jobs, opts.workers)
        for i, (x, (res, (kind, reason))) in enumerate(zip(inputs, results)):
            bar.update(1)
            if res is None:
                report.skip(x.path, kind, reason)
                continue
            yield i, x, res


def _read_file(path: str) -> tuple[Optional[bytes], tuple[str, str]]:
    """A regular file's bytes, or None and the skip (a fifo would block the build for ever)."""
    if not os.path.isfile(path):
        return None, ("unreadable", "cannot read: " + ("not a regular file" if os.path.exists(path) else "file not found"))
    try:
        with open(path, "rb") as f:
            return f.read(), ("", "")
    except OSError as exn:
        return None, ("unreadable", f"cannot read: {exn.strerror or _short(exn)}")

def _write(report: BuildReport, opts: _Options, samples: Iterator[dict], *, modality: str,
           tokenizer: Optional[str] = None, extra: Optional[dict] = None) -> BuildReport:
    # The report's skip counts, by reference: the index is written after the last sample, when the
    # generator has counted every skip.
    extra = {"tool": report.tool, **(extra or {}), "skipped": report.skip_counts}
    try:
        index = write_shard_set(
            opts.out, samples, prefix=opts.prefix, modality=modality, tokenizer=tokenizer,
            samples_per_shard=opts.samples_per_shard,
            shard_bytes=None if opts.shard_mb is None else opts.shard_mb * 1e6,
            extra=extra,
        )
    except ValueError as exn:
        if "no samples" not in str(exn):
            raise
        report.error = "no samples to write: every input was skipped or there were none"
        return report
    report.samples, report.shards, report.bytes = index["num_samples"], index["num_shards"], index["num_bytes"]
    report.spec = os.path.join(opts.out, index["spec"])
    report.index_path = index["index_path"]
    return report


# ============================================================================= image
def _image_format(data: bytes) -> Optional[str]:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return None


def _image_job(job: tuple) -> tuple[Optional[tuple[bytes, str]], tuple[str, str]]:
    """(path, reencode, quality, max_pixels) -> ((bytes, fmt), ("", "")) or (None, (kind, reason)).
    The file is decoded as the loader decodes it (the pixel limit checked from its header first)."""
    path, reencode, quality, max_pixels = job
    import torchvision.io as tvio

    from scaling.modalities.vision import decode_image_bytes

    data, why = _read_file(path)
    if data is None:
        return None, why
    if not data:
        return None, ("empty", "empty file")
    fmt = _image_format(data)
    try:
        # gray stays gray, the rest RGB; alpha dropped; the first frame of an animation; 8 bits
        img = decode_image_bytes(data, None, max_pixels, limit_name="--max-pixels")
    except BadSample as exn:
        return None, (exn.kind, str(exn))
    if reencode:
        with quiet_tv_io():
            out = tvio.encode_png(img) if reencode == "png" else tvio.encode_jpeg(img, quality=quality)
        return (out.numpy().tobytes(), reencode), ("", "")
    if fmt not in STORED_IMAGE_FORMATS:
        return None, ("unsupported_format", f"{fmt or 'unrecognised'} images are not stored as they are (the loader "
                      f"reads {'/'.join(STORED_IMAGE_FORMATS)}); pass --reencode png or jpg")
    return (data, fmt), ("", "")


def build_image_shards(src: str, opts: _Options, *, labels: str = "auto", reencode: Optional[str] = None,
                       jpeg_quality: int = 95, exts: tuple[str, ...] = IMAGE_EXTS,
                       max_pixels: int = VisionDataConfig.max_pixels) -> BuildReport:
    report = BuildReport("scaling-shards image")
    inputs, classes = _folder_or_list(src, exts, labels, report, opts, label_column=1, fairseq_root=False)
    jobs = [(x.path, reencode, jpeg_quality, max_pixels) for x in inputs]

    def samples():
        for i, x, (data, fmt) in _decoded(inputs, _image_job, jobs, "images", opts, report):
            yield encode_vision_sample(_key(i, x.path), data, label=x.label, fmt=fmt)

    extra = {"source": os.path.abspath(src), "reencode": reencode, "max_pixels": int(max_pixels)}
    if classes is not None:
        extra["classes"] = classes
    _write(report, opts, samples(), modality="vision", extra=extra)
    return report


# ============================================================================= audio
def _audio_job(job: tuple) -> tuple[Optional[dict], tuple[str, str]]:
    """(path, label, sample_rate, max_seconds) -> (sample members without key, ("", "")) or
    (None, (kind, reason)). The header is checked first (the duration limit), then the file is decoded
    as the loader decodes it (mono) and resampled with soxr when its rate is another."""
    path, label, target_sr, max_seconds = job
    from scaling.modalities.speech import audio_header, decode_audio

    if not os.path.isfile(path):  # soundfile would open a fifo and wait on it
        return None, ("unreadable", "cannot read: " + ("not a regular file" if os.path.exists(path) else "file not found"))
    try:
        info = audio_header(path, max_seconds, limit_name="--max-seconds")
        audio = decode_audio(path)
    except BadSample as exn:
        return None, (exn.kind, str(exn))
    if info.samplerate != target_sr:
        import soxr

        audio = soxr.resample(audio, info.samplerate, target_sr)
        if audio.shape[0] == 0:
            return None, ("empty", f"no samples left after resampling {info.frames} frames to {target_sr} Hz")
    sample = encode_speech_sample("x", audio, target_sr, label=label)
    del sample["__key__"]
    return sample, ("", "")


def build_audio_shards(src: str, opts: _Options, *, sample_rate: int = 16000, labels: str = "none",
                       exts: tuple[str, ...] = ("wav", "flac"),
                       max_seconds: float = SpeechDataConfig.max_seconds) -> BuildReport:
    report = BuildReport("scaling-shards audio")
    inputs, classes = _folder_or_list(src, exts, labels, report, opts, label_column=2, fairseq_root=True)
    jobs = [(x.path, x.label, sample_rate, max_seconds) for x in inputs]

    def samples():
        for i, x, res in _decoded(inputs, _audio_job, jobs, "audio", opts, report):
            yield {"__key__": _key(i, x.path), **res}

    extra = {"source": os.path.abspath(src), "sample_rate": int(sample_rate), "max_seconds": float(max_seconds)}
    if classes is not None:
        extra["classes"] = classes
    _write(report, opts, samples(), modality="speech", extra=extra)
    return report


# ============================================================================= text
def _text_files(srcs: list[str], exts: tuple[str, ...], report: BuildReport) -> list[str]:
    files = []
    for src in srcs:
        if os.path.isdir(src):
            found, ignored = _walk(src, exts, report)
            if ignored:
                report.notes.append(f"{ignored} files under {src} without a {'/'.join(exts)} extension were not read")
            files += [f for f, _ in found]
        elif os.path.isfile(src):
            files.append(src)
        else:
            report.skip(src, "unreadable", "not found")
    return files


def _text_encoding(head: bytes) -> str:
    """UTF-16/32 when the file starts with their byte-order mark (Windows tools write them), else UTF-8
    (a UTF-8 BOM is dropped). Other encodings are not guessed: their files are skipped as not UTF-8."""
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return name
    return "utf-8-sig"


def _documents(files: list[str], unit: str, report: BuildReport, bar) -> Iterator[tuple[str, str, str]]:
    """``(path, key suffix, text)`` per non-empty document, whitespace stripped. UTF-8, or UTF-16/32
    with a byte-order mark; a file (``unit`` file) or a line (``unit`` line) that does not decode is
    skipped, the rest of its file is still read."""
    for path in files:
        try:
            if not os.path.isfile(path):
                report.skip(path, "unreadable", "not a regular file" if os.path.exists(path) else "not found")
                continue
            try:
                f = open(path, "rb")
            except OSError as exn:
                report.skip(path, "unreadable", f"cannot read: {exn.strerror or _short(exn)}")
                continue
            with f:
                encoding = _text_encoding(f.read(4))
                f.seek(0)
                if unit == "file" or encoding != "utf-8-sig":
                    # UTF-16/32 lines cannot be cut at b"\n": the whole file is decoded, then split.
                    try:
                        raw = f.read()
                    except OSError as exn:
                        report.skip(path, "unreadable", f"cannot read: {exn.strerror or _short(exn)}")
                        continue
                    try:
                        text = raw.decode(encoding)
                    except UnicodeDecodeError as exn:
                        report.skip(path, "not_utf8", f"not {'UTF-8' if encoding == 'utf-8-sig' else encoding.upper()} "
                                    f"text (bad byte at offset {exn.start})")
                        continue
                    if unit == "file":
                        if not text.strip():
                            report.skip(path, "empty", "empty document")
                            continue
                        yield path, "", text.strip()
                        continue
                    lines = enumerate(text.split("\n"), 1)
                else:
                    lines = enumerate(f, 1)
                for lineno, line in lines:
                    if isinstance(line, bytes):
                        try:
                            line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                        except UnicodeDecodeError as exn:
                            report.skip(f"{path}:{lineno}", "not_utf8", f"not UTF-8 text (bad byte at offset {exn.start})")
                            continue
                    text = line.strip()
                    if text:  # blank lines separate documents; they are not inputs
                        yield path, f"_l{lineno}", text
        finally:
            bar.update(1)


def build_text_shards(src: str, opts: _Options, *, tokenizer: str, doc: str = "auto",
                      exts: tuple[str, ...] = ("txt",), labels: str = "none", batch_docs: int = 256) -> BuildReport:
    import sentencepiece as spm

    report = BuildReport("scaling-shards text")
    ident = _check_project_tokenizer(tokenizer)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    unit = ("file" if os.path.isdir(src) else "line") if doc == "auto" else doc
    classes = None
    if os.path.isdir(src) and labels != "none":
        inputs, classes = _scan_folder(src, exts, labels, report)
    else:
        inputs = [_Input(p) for p in _text_files([src], exts, report)]
    inputs = _order(inputs, opts.shuffle, opts.seed)
    label_of = {x.path: x.label for x in inputs}

    def samples():
        counter = 0
        with _progress(len(inputs), "text", opts.progress) as bar:
            docs = _documents([x.path for x in inputs], unit, report, bar)
            while True:
                batch = [d for _, d in zip(range(batch_docs), docs)]
                if not batch:
                    return
                encoded = sp.encode([t for _, _, t in batch], num_threads=max(1, opts.workers))
                for (path, suffix, _), ids in zip(batch, encoded):
                    if not ids:
                        report.skip(path + suffix.replace("_l", ":"), "no_tokens", "no tokens")
                        continue
                    yield encode_text_sample(_key(counter, path, suffix), np.asarray(ids, dtype=np.int32),
                                             label=label_of.get(path))
                    counter += 1

    extra = {"source": os.path.abspath(src), "documents": f"one per {unit}"}
    if classes is not None:
        extra["classes"] = classes
    _write(report, opts, samples(), modality="text", tokenizer=tokenizer, extra=extra)
    if report.samples:
        report.notes.append(f"tokenizer {tokenizer}: vocab {ident['vocab_size']}, sha256 {ident['sha256']}")
    return report


# ============================================================================= CLI
_SHARDS_USAGE = """scaling-shards {image,audio,text} SRC OUT [options]

Build an indexed webdataset shard set OUT/<prefix>-NNNNNN.tar + OUT/<prefix>.index.json.
  image SRC OUT                      image folder tree (class sub-folders -> labels) or list file
  audio SRC OUT                      folder of wav/flac or a tsv manifest -> 16 kHz FLAC
  text  SRC OUT --tokenizer MODEL    text file(s), one document per file or per line -> token ids
A bad input is skipped (the summary and the index count the skips by reason); it never stops the build.
Folders are walked once per real folder: a symlink is followed only to a target inside SRC not read yet
(a link out of SRC, a dangling one or a loop is skipped as 'symlink'); labels come from real paths.
'scaling-shards COMMAND -h' lists each command's options."""


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--prefix", default="train", help="shard names <prefix>-NNNNNN.tar (default train)")
    p.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_MB, metavar="MB",
                   help=f"close a shard once it holds this many MB (10^6 bytes; default {DEFAULT_SHARD_MB:g}; 0: no limit)")
    p.add_argument("--samples-per-shard", type=int, default=None, metavar="N",
                   help="close a shard after N samples (default: no limit; both limits may be given)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding inputs (text: encoder threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-off input shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted input order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set of the same prefix in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare_out(out: str, prefix: str, overwrite: bool) -> Optional[str]:
    """Refuses (returns a message) to mix with an existing shard set of the same prefix unless
    ``overwrite``, in which case its shards and index are removed first."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"OUT {out} exists and is not a folder"
    if not os.path.isdir(out):
        return None
    old = sorted(f for f in os.listdir(out)
                 if f == prefix + INDEX_SUFFIX or ((m := _SHARD_NAME.fullmatch(f)) is not None and m["prefix"] == prefix))
    if old and not overwrite:
        return f"{out} already holds a '{prefix}' shard set ({len(old)} files, e.g. {old[0]}); pass --overwrite to replace it"
    for f in old:
        os.remove(os.path.join(out, f))
    return None


def shards_main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("image", "audio", "text")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(_SHARDS_USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd = argv.pop(0)
    p = argparse.ArgumentParser(prog=f"scaling-shards {cmd}", epilog=(
        "A bad input is skipped and counted by reason in the summary and the index; it never stops the build. "
        "Symlinks are followed only to targets inside SRC not read yet (each real folder once); links out of SRC, "
        "dangling links and loops are skipped as 'symlink'. Labels come from the real path relative to SRC."))
    _common_args(p)
    if cmd == "image":
        p.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                       help="auto (default): class sub-folders become labels when every image is in one")
        p.add_argument("--reencode", choices=("png", "jpg"), default=None, help="re-encode instead of storing the bytes as they are")
        p.add_argument("--jpeg-quality", type=int, default=95)
        p.add_argument("--ext", default=",".join(IMAGE_EXTS), help="file extensions read from a folder")
        p.add_argument("--max-pixels", type=int, default=VisionDataConfig.max_pixels, metavar="N",
                       help="skip images of more than N pixels, from their header before decoding (default "
                            f"{VisionDataConfig.max_pixels}, data.vision.max_pixels' default)")
    elif cmd == "audio":
        p.add_argument("--sample-rate", type=int, default=16000, help="resample to this rate (soxr) when needed")
        p.add_argument("--labels", choices=("auto", "folders", "none"), default="none",
                       help="folders: first-level sub-folder names become labels (default none)")
        p.add_argument("--ext", default="wav,flac", help="file extensions read from a folder (default wav,flac)")
        p.add_argument("--max-seconds", type=float, default=SpeechDataConfig.max_seconds, metavar="S",
                       help="skip files longer than S seconds, from their header before decoding (default "
                            f"{SpeechDataConfig.max_seconds:g}, data.speech.max_seconds' default)")
    else:
        p.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece model (scaling-tokenizer train)")
        p.add_argument("--doc", choices=("auto", "file", "line"), default="auto",
                       help="one document per file or per line (auto: per line for a file SRC, per file for a folder)")
        p.add_argument("--labels", choices=("folders", "none"), default="none")
        p.add_argument("--ext", default="txt", help="file extensions read from a folder (default txt)")
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        p.error(f"SRC {args.src} not found")
    if getattr(args, "max_pixels", 1) <= 0 or getattr(args, "max_seconds", 1) <= 0:
        p.error("--max-pixels / --max-seconds must be positive")
    if args.samples_per_shard is not None and args.samples_per_shard <= 0:
        p.error("--samples-per-shard must be positive")
    if args.shard_size < 0 or 0 < args.shard_size * 1e6 < 10240:
        p.error("--shard-size must be 0 (no limit) or at least 0.01024 MB (one tar record)")
    if not args.prefix or "." in args.prefix or "/" in args.prefix:
        p.error("--prefix must be non-empty and contain no '.' or '/'")
    if cmd == "text":
        if not os.path.isfile(args.tokenizer):
            p.error(f"--tokenizer {args.tokenizer} not found")
        try:
            _check_project_tokenizer(args.tokenizer)
        except (RuntimeError, ValueError) as exn:  # not a sentencepiece model, or other special ids
            p.error(f"--tokenizer {args.tokenizer}: {_short(exn, 400)}")
    msg = _prepare_out(args.out, args.prefix, args.overwrite)
    if msg:
        p.error(msg)
    opts = _Options(out=args.out, prefix=args.prefix, shard_mb=args.shard_size or None,
                    samples_per_shard=args.samples_per_shard, shuffle=not args.no_shuffle, seed=args.seed,
                    workers=max(1, args.workers), progress=not args.no_progress)
    exts = tuple(e.strip().lower().lstrip(".") for e in args.ext.split(",") if e.strip())
    if cmd == "image":
        report = build_image_shards(args.src, opts, labels=args.labels, reencode=args.reencode,
                                    jpeg_quality=args.jpeg_quality, exts=exts, max_pixels=args.max_pixels)
    elif cmd == "audio":
        report = build_audio_shards(args.src, opts, sample_rate=args.sample_rate, labels=args.labels, exts=exts,
                                    max_seconds=args.max_seconds)
    else:
        report = build_text_shards(args.src, opts, tokenizer=args.tokenizer, doc=args.doc, exts=exts, labels=args.labels)
    print(report.summary(), flush=True)
    return 1 if report.error else 0


_TOKENIZER_USAGE = """scaling-tokenizer train TEXT... OUT --vocab-size N [options]
scaling-tokenizer info MODEL

train: a sentencepiece model OUT.model (+ OUT.vocab) with the project's special ids
       (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4) from the non-empty lines of the TEXT files/folders.
info:  the model's identity as the shard index records it (sha256, vocab size, special ids)."""


def _model_prefix(out: str) -> str:
    if out.endswith(".model"):
        return out[: -len(".model")]
    if os.path.isdir(out) or out.endswith(os.sep):
        return os.path.join(out, "tokenizer")
    return out


def tokenizer_main(argv: Optional[list[str]] = None) -> int:
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "info"):
        helped = bool(argv) and argv[0] in ("-h", "--help")
        print(_TOKENIZER_USAGE, file=sys.stdout if helped else sys.stderr)
        return 0 if helped else 2
    cmd = argv.pop(0)
    if cmd == "info":
        p = argparse.ArgumentParser(prog="scaling-tokenizer info")
        p.add_argument("model", metavar="MODEL")
        args = p.parse_args(argv)
        if not os.path.isfile(args.model):
            p.error(f"{args.model} not found")
        print(json.dumps(tokenizer_identity(args.model), indent=1))
        return 0

    p = argparse.ArgumentParser(prog="scaling-tokenizer train")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text files or folders (lines are the training sentences)")
    p.add_argument("out", metavar="OUT", help="model path (OUT.model, or OUT/tokenizer.model for a folder)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("unigram", "bpe", "char", "word"), default="unigram")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=1_000_000, help="lines sampled for training (default 1M)")
    p.add_argument("--max-sentence-length", type=int, default=8192, help="longer lines (bytes) are left out")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="training threads (default 1)")
    p.add_argument("--ext", default="txt", help="file extensions read from a folder (default txt)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    if args.vocab_size <= len(SPECIAL_PIECES):
        p.error("--vocab-size must exceed the 5 special pieces")
    prefix = _model_prefix(args.out)
    report = BuildReport("scaling-tokenizer train")
    exts = tuple(e.strip().lower().lstrip(".") for e in args.ext.split(",") if e.strip())
    files = _text_files(args.texts, exts, report)
    counts = {"lines": 0, "too_long": 0}

    def sentences():
        with _progress(len(files), "text", not args.no_progress) as bar:
            for _, _, text in _documents(files, "line", report, bar):
                if len(text.encode()) > args.max_sentence_length:
                    counts["too_long"] += 1
                    continue
                counts["lines"] += 1
                yield text

    try:
        path = train_tokenizer(sentences(), prefix, args.vocab_size, model_type=args.model_type,
                               input_sentence_size=args.input_sentence_size,
                               character_coverage=args.character_coverage,
                               max_sentence_length=args.max_sentence_length, seed=args.seed,
                               num_threads=max(1, args.threads))
    except RuntimeError as exn:
        print(f"scaling-tokenizer train: failed after {counts['lines']} lines of {len(files)} files: {_short(exn, 400)}",
              file=sys.stderr)
        for src, reason in report.skipped[:MAX_LISTED_SKIPS]:
            print(f"  skipped {src}: {reason}", file=sys.stderr)
        return 1
    ident = tokenizer_identity(path)
    print(f"scaling-tokenizer train: {path} ({args.model_type}, vocab {ident['vocab_size']}, sha256 {ident['sha256']}) "
          f"from {counts['lines']} lines of {len(files)} files; {len(report.skipped)} input"
          f"{'s' * (len(report.skipped) != 1)} skipped", flush=True)
    if counts["too_long"]:
        print(f"  note: {counts['too_long']} lines over {args.max_sentence_length} bytes left out")
    for n in report.notes:
        print(f"  note: {n}")
    for src, reason in report.skipped[:MAX_LISTED_SKIPS]:
        print(f"  skipped {src}: {reason}")
    if len(report.skipped) > MAX_LISTED_SKIPS:
        print(f"  ... and {len(report.skipped) - MAX_LISTED_SKIPS} more skipped inputs")
    return 0

