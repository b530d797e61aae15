"""The training data stream: shards (or a synthetic source) -> per-rank shuffled samples -> batches.

Per epoch and rank (reference: scaling-anchors §3.2, "design for our tar shards"):

1. shard order = a permutation drawn from ``(seed, epoch)``;
2. the shard at position i of that order goes to rank ``i % world_size``; with fewer shards than
   ranks every rank reads all shards and keeps the samples whose running index is
   ``rank (mod world_size)``;
3. a shuffle buffer of ``data.shuffle_buffer`` raw (still encoded) samples, with an RNG from
   ``(seed, epoch, rank)``;
4. each sample is decoded and masked with ``sample_rng(seed, epoch, id)``, where ``id`` is
   ``crc32(shard basename + "/" + __key__)``: its mask does not depend on its batch neighbours,
   on the rank or on the micro-batch size;
5. items are grouped into micro-batches. The stream is infinite: epoch e+1 follows epoch e
   without a gap (a batch may straddle the boundary), and the trainer decides the step count.

Position and resume. The loader's position is ``(epoch, raw, sub)``: the next item to hand out
is item ``sub`` of raw sample ``raw`` (counted after rank split and shuffle) of ``epoch``.
CURRENT IMPLEMENTATION of resume: ``load_state_dict`` re-creates that epoch's deterministic
stream and skips the ``raw`` samples already consumed (they are read from the tars and go through
the shuffle buffer, but are not decoded). The cost is up to one epoch of tar reading per rank.
A later version keeps shard cursors (shard, member offset, shuffle-buffer contents) instead; that
change stays behind :class:`Loader`'s interface (``state_dict``/``load_state_dict``).

``data.train_shards == "synthetic"``: an infinite synthetic source (sum of sinusoids for speech,
rectangles on gradients for vision, a Markov chain for text), deterministic per
``(seed, global sample index)``. Synthetic "epochs" are blocks of ``synthetic_epoch_size``
global indices; rank r takes the indices ``r (mod world_size)``.

``num_workers > 0``: a torch ``DataLoader`` over an iterable dataset. Every worker walks the
same raw stream (cheap: tar reading only) and decodes the raw samples whose running index is
``worker (mod num_workers)``, yielding exactly one (possibly empty) list of items per raw sample;
the DataLoader returns worker outputs round-robin, which is exactly raw order, so batches are
identical to those of ``num_workers = 0``.
"""

from __future__ import annotations

import os
import warnings
import zlib
from typing import Iterator, Optional

import numpy as np
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data.collate import BOS_ID, EOS_ID, SampleProcessor
from scaling.data.shards import check_shard_set, expand_shards
from scaling.masking import sample_rng

__all__ = ["Loader", "build_loader", "sample_id", "BOS_ID", "EOS_ID"]

STATE_VERSION = 1
DEFAULT_SYNTHETIC_EPOCH_SIZE = 100_000

# Tags that separate the RNG streams drawn from the same seed.
_TAG_SHARD_ORDER = 0x5348_4F52
_TAG_SHUFFLE = 0x5348_5546
_TAG_SYNTH = 0x5359_4E54
_TAG_MARKOV = 0x4D41_524B


def sample_id(shard_path: str, key: str) -> int:
    """Stable id of a webdataset sample: crc32 of ``<shard basename>/<__key__>``."""
    return zlib.crc32(f"{os.path.basename(shard_path)}/{key}".encode())


# ============================================================================= raw sources
class _ShardSource:
    """Raw (encoded) samples of one rank and epoch, from tar shards."""

    def __init__(self, paths: list[str], seed: int, rank: int, world_size: int, shuffle_buffer: int):
        self.paths = list(paths)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = int(shuffle_buffer)

    def describe(self) -> str:
        return f"shards:{len(self.paths)}"

    def shards_of(self, epoch: int) -> tuple[list[str], bool]:
        """(this rank's shards in read order, whether samples must be split by index)."""
        order = np.random.default_rng([self.seed, epoch, _TAG_SHARD_ORDER]).permutation(len(self.paths))
        ordered = [self.paths[i] for i in order]
        if len(ordered) >= self.world_size:
            return ordered[self.rank :: self.world_size], False
        return ordered, True

    def _read(self, epoch: int) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        mine, split = self.shards_of(epoch)
        index = 0
        for path in mine:
            def handler(exn, path=path):
                warnings.warn(f"skipping unreadable data in shard {path}: {exn!r}")
                return True

            for raw in tarfile_samples([{"url": path}], handler=handler):
                if split:
                    keep = index % self.world_size == self.rank
                    index += 1
                    if not keep:
                        continue
                yield raw

    def epoch_raws(self, epoch: int) -> Iterator[dict]:
        it = self._read(epoch)
        size = self.shuffle_buffer
        if size <= 1:
            yield from it
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank, _TAG_SHUFFLE])
        buf: list[dict] = []
        for raw in it:
            if len(buf) < size:
                buf.append(raw)
                continue
            j = int(rng.integers(size))
            out, buf[j] = buf[j], raw
            yield out
        rng.shuffle(buf)
        yield from buf

    def items(self, proc: SampleProcessor, raw: dict, epoch: int) -> list[dict]:
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        try:
            return proc.from_raw(raw, epoch, sample_id(url, key))
        except Exception as exn:  # a bad sample never stops training (fuller policy later)
            warnings.warn(f"skipping bad sample {key!r} in shard {url}: {exn!r}")
            return []


class _SyntheticSource:
    """Synthetic samples with learnable structure, deterministic per (seed, global index)."""

    def __init__(self, data_cfg: DataConfig, model_cfg: ModelConfig, seed: int, rank: int, world_size: int, epoch_size: int):
        if epoch_size < world_size:
            raise ValueError(f"synthetic_epoch_size ({epoch_size}) must be >= world_size ({world_size})")
        self.data_cfg, self.model_cfg = data_cfg, model_cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch_size = int(epoch_size)
        self._markov = None

    def describe(self) -> str:
        return f"synthetic:{self.epoch_size}"

    def epoch_raws(self, epoch: int) -> Iterator[dict]:
        start = epoch * self.epoch_size
        for g in range(start + self.rank, start + self.epoch_size, self.world_size):
            yield {"__synthetic__": g}

    def items(self, proc: SampleProcessor, raw: dict, epoch: int) -> list[dict]:
        g = raw["__synthetic__"]
        rng = sample_rng(self.seed, g, _TAG_SYNTH)
        m = self.model_cfg.modality
        if m == "speech":
            audio, label = self._speech(rng)
            return proc.speech_items(audio, self.data_cfg.speech.sample_rate, epoch, g, label)
        if m == "vision":
            image, label = self._vision(rng)
            return proc.vision_items(image, epoch, g, label)
        return proc.text_items(self._text(rng), epoch, g, None)

    def _speech(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        dc = self.data_cfg.speech
        sr = dc.sample_rate
        n = int(rng.integers(dc.min_samples, max(dc.min_samples, dc.max_samples) + 1))
        k = int(rng.integers(2, 4))
        t = np.arange(n, dtype=np.float64) / sr
        freqs = rng.uniform(80.0, min(4000.0, 0.45 * sr), size=k)
        amps = rng.uniform(0.1, 0.5, size=k)
        phases = rng.uniform(0.0, 2 * np.pi, size=k)
        audio = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(0)
        audio += 0.01 * rng.standard_normal(n)
        return audio.astype(np.float32), k - 2  # label: 2 or 3 tones

    def _vision(self, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        vc = self.model_cfg.vision
        S, C = vc.image_size, vc.channels
        # Background: a linear gradient between two colours in a random direction.
        c0, c1 = rng.uniform(0, 255, size=(2, C))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:S, 0:S] / max(S - 1, 1)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
        img = c0[:, None, None] + (c1 - c0)[:, None, None] * ramp[None]
        n_rect = int(rng.integers(0, 4))
        for _ in range(n_rect):
            h, w = rng.integers(max(1, S // 8), max(2, S // 2) + 1, size=2)
            top, left = int(rng.integers(0, S - h + 1)), int(rng.integers(0, S - w + 1))
            img[:, top : top + h, left : left + w] = rng.uniform(0, 255, size=C)[:, None, None]
        return torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8)), n_rect

    def _text(self, rng: np.random.Generator) -> np.ndarray:
        tc = self.model_cfg.text
        if self._markov is None:
            mrng = sample_rng(self.seed, _TAG_MARKOV)
            first = tc.mask_id + 1
            if tc.vocab_size - first < 2:
                raise ValueError(f"model.text.vocab_size ({tc.vocab_size}) leaves no room for synthetic tokens")
            n_states = min(tc.vocab_size - first, 256)
            states = mrng.choice(np.arange(first, tc.vocab_size), n_states, replace=False)
            K = min(4, n_states)
            succ = np.stack([mrng.choice(n_states, K, replace=False) for _ in range(n_states)])
            probs = mrng.dirichlet(np.full(K, 0.5), size=n_states)
            self._markov = (states, succ, np.cumsum(probs, axis=1))
        states, succ, cum = self._markov
        content = self.data_cfg.text.block_size - 2
        # One block per document, so every synthetic sample is one item: a rank split by sample index
        # then gives every world size the same global batches (engines are tested against one process).
        length = int(rng.integers(min(8, content), content + 1))
        out = np.empty(length, dtype=np.int64)
        s = int(rng.integers(len(states)))
        u = rng.random(length)
        for i in range(length):
            out[i] = states[s]
            j = min(int(np.searchsorted(cum[s], u[i])), cum.shape[1] - 1)
            s = int(succ[s, j])
        return out


# ============================================================================= item stream
def _positions(source, proc: SampleProcessor, epoch: int, raw_start: int, worker: int = 0, num_workers: int = 1):
    """Yields ``(epoch, raw, items)`` from (epoch, raw_start) on, forever.

    With ``num_workers > 1`` only the raw samples with running index ``worker (mod
    num_workers)`` (counted from the start position) are decoded and yielded."""
    running = 0
    while True:
        seen = 0
        for r, raw in enumerate(source.epoch_raws(epoch)):
            seen += 1
            if r < raw_start:
                continue  # consumed before the checkpoint: read (for the shuffle buffer), not decoded
            mine = running % num_workers == worker
            running += 1
            if mine:
                yield epoch, r, source.items(proc, raw, epoch)
        if seen == 0:
            raise RuntimeError(f"rank {source.rank} has no samples in epoch {epoch} ({source.describe()})")
        epoch += 1
        raw_start = 0


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, source, proc, epoch: int, raw_start: int):
        super().__init__()
        self.source, self.proc, self.epoch, self.raw_start = source, proc, epoch, raw_start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (0, 1) if info is None else (info.id, info.num_workers)
        return _positions(self.source, self.proc, self.epoch, self.raw_start, w, n)


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


def _item_stream(source, proc, pos: tuple[int, int, int], num_workers: int, seed: int):
    """Yields ``(epoch, raw, sub, item)`` from position ``pos`` = (epoch, raw, sub) on, forever."""
    epoch, raw_start, sub_start = pos
    if num_workers > 0:
        dl = torch.utils.data.DataLoader(
            _WorkerStream(source, proc, epoch, raw_start),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init,
            # A private generator: creating the DataLoader must not consume the global RNG.
            generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4,
        )
        outputs = iter(dl)
    else:
        outputs = _positions(source, proc, epoch, raw_start)
    empty_epochs, last_epoch, had_items = 0, epoch, False
    for e, r, items in outputs:
        if e != last_epoch:
            empty_epochs = 0 if had_items else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(f"rank {source.rank}: no usable samples in two whole epochs ({source.describe()})")
            last_epoch, had_items = e, False
        for s, item in enumerate(items):
            if (e, r) == (epoch, raw_start) and s < sub_start:
                continue  # consumed before the checkpoint
            had_items = True
            yield e, r, s, item


# ============================================================================= loader
class Loader:
    """Infinite iterator of micro-batches (dict of CPU tensors) with exact resume.

    ``state_dict()`` holds plain ints/strings only (safe for ``torch.load(weights_only=True)``).
    ``epoch`` is the epoch of the last sample handed out (the start epoch before the first batch).
    """

    def __init__(self, source, proc: SampleProcessor, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int = 0):
        if micro_batch_size <= 0:
            raise ValueError("micro_batch_size must be positive")
        self.source, self.proc = source, proc
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = int(num_workers)
        self.epoch = 0
        self._pos = (0, 0, 0)  # (epoch, raw, sub) of the next item
        self.samples_consumed = 0
        self._it = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            # A free function, not a method: the generator must not reference the Loader, or
            # Loader <-> generator would form a cycle, and DataLoader workers would then be shut
            # down only by the cyclic GC (which waits on each worker's join timeout, ~5 s).
            self._it = _item_stream(self.source, self.proc, self._pos, self.num_workers, self.seed)
        items = []
        for _ in range(self.micro_batch_size):
            e, r, s, item = next(self._it)
            items.append(item)
            self._pos = (e, r, s + 1)
            self.epoch = e
        self.samples_consumed += len(items)
        return self.proc.collate(items)

    def close(self) -> None:
        """Stop the item stream (and its DataLoader workers, if any) now; iteration may resume."""
        if self._it is not None:
            self._it.close()
            self._it = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        e, r, s = self._pos
        return {
            "version": STATE_VERSION,
            "epoch": int(e),
            "raw": int(r),
            "sub": int(s),
            "samples_consumed": int(self.samples_consumed),
            "seed": int(self.seed),
            "rank": int(self.rank),
            "world_size": int(self.world_size),
            "source": self.source.describe(),
            "modality": self.proc.modality,
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {d.get('version')} != {STATE_VERSION}")
        for k, mine in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size),
                        ("source", self.source.describe()), ("modality", self.proc.modality)):
            if d.get(k) != mine:
                raise ValueError(f"loader state has {k}={d.get(k)!r} but this loader has {k}={mine!r}; "
                                 "resuming with a different data layout is not supported")
        self._pos = (int(d["epoch"]), int(d["raw"]), int(d["sub"]))
        self.epoch = int(d["epoch"])
        self.samples_consumed = int(d.get("samples_consumed", 0))
        self.close()  # the stream is re-created from the new position at the next batch


def build_loader(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    masking_cfg: MaskingConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    synthetic_epoch_size: Optional[int] = None,
) -> Loader:
    """The training loader of one rank (see the module docstring).

    Shards are checked against their indexes first (:func:`scaling.data.shards.check_shard_set`).
    ``synthetic_epoch_size`` (synthetic source only): global samples per synthetic epoch
    (default 100,000); tests use a small one to cross epoch boundaries."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    proc = SampleProcessor(data_cfg, model_cfg, masking_cfg, seed)
    if data_cfg.train_shards.strip() == "synthetic":
        source = _SyntheticSource(data_cfg, model_cfg, seed, rank, world_size,
                                  synthetic_epoch_size or DEFAULT_SYNTHETIC_EPOCH_SIZE)
    else:
        paths = expand_shards(data_cfg.train_shards)  # ValueError naming a missing shard
        # Before any training: shards vs their indexes (listed, sizes, modality) and, for text, the
        # tokenizer they were made with vs data.text.tokenizer (ValueError naming the files).
        tc = model_cfg.text
        check_shard_set(paths, modality=model_cfg.modality, tokenizer=data_cfg.text.tokenizer or None,
                        vocab_size=tc.vocab_size, pad_id=tc.pad_id, mask_id=tc.mask_id)
        source = _ShardSource(paths, seed, rank, world_size, data_cfg.shuffle_buffer)
    return Loader(source, proc, seed=seed, rank=rank, world_size=world_size,
                  micro_batch_size=micro_batch_size, num_workers=data_cfg.num_workers)
