"""The training data stream: shards (or a synthetic source) -> per-slot shuffled samples -> batches.

Slots (:mod:`scaling.data.partition`, after mosaicml/streaming's elastic determinism). A job
has ``world_size x max(1, data.num_workers)`` slots, one per (rank, DataLoader worker). Epoch ``e``
reads the shards in a permutation drawn from ``(seed, e)``; the concatenation of their samples is
cut into one contiguous, equal (+-1) run of positions per slot. Every sample is read exactly once
per epoch across the job; uneven shards only move the cut points. The stream is infinite (epoch
e+1 follows e without a gap, a batch may straddle the boundary) and the trainer counts steps, so
no rank runs dry and no collective hangs; ``epochs=N`` gives a finite pass (probes, evaluation).

Per slot:

1. its positions are read in order from the tars (webdataset's tar iterator; a run that starts
   inside a shard seeks to its sample through a scan of the tar headers, no member data is read);
2. shuffle: consecutive windows of ``data.shuffle_buffer`` positions are each permuted with an RNG
   from ``(seed, segment, slot, window)``. Unlike webdataset's reservoir buffer, the window's
   content is a function of its position, so the shuffle state is a cursor, not sample bytes;
3. each sample is decoded, augmented and masked with ``sample_rng(seed, epoch, id)``, where ``id`` is
   ``crc32(shard basename + "/" + __key__)``: independent of its neighbours, its slot and the batch size;
   a bad one is skipped and counted (:mod:`scaling.data.quality`);
4. items (text documents give one per 512-token block) are batched inside the slot; with workers,
   the DataLoader hands out batches round-robin over the workers, which is deterministic.

State and exact resume. A slot's cursor is ``(segment, raw, sub)``: the next item is item ``sub``
of the sample at position ``raw`` of the segment's shuffled order; a segment is an epoch, or the
catch-up list after a layout change (``CATCHUP``). Resuming re-reads at most one shuffle window
(from a seek, not from the shard's start) and decodes nothing before the cursor. The state also
holds the next worker of the round-robin and the slot's counters: on the same layout the next
batches are exactly those of the uninterrupted run. On another world size or worker count,
:meth:`Loader.load_job_state` gathers every old slot's unread positions (its window's shuffled
order tells which positions of the current window were handed out) into a catch-up list, splits it over the new slots and then starts the next epoch: nothing
is skipped or read twice (a text document the old slot was inside of is read again whole). It
says so in a warning.

Bucketed speech batches (``build_loader(max_batch_audio_samples=N)``, N > 0; speech only). Fixed-count
batches of 2-20 s clips are mostly padding. As fairseq's ``max_tokens`` (``batch_by_size`` over
``ordered_indices``, :mod:`scaling.data.bucketing`; docs/data.md), a batch then holds as many
utterances as fit ``count x longest <= N`` samples of audio, and ``micro_batch_size`` only bounds the
count (0: no bound). Each shuffle window of the slot's stream is the look-ahead: its samples' item
lengths (from the ``json`` ``num_samples``, no decode) are sorted longest first, cut greedily under
N, and the window's batches are emitted in an order drawn from ``(seed, segment, slot, window)``,
so the model does not see long-then-short runs; a window's samples are decoded batch by batch (only
the window's encoded bytes are held, as for fixed-count batches). Batches never straddle windows
or epochs. The cursor is ``(segment, window start, next batch, mask)``, ``mask`` the bit set (hex) of
the window's samples already handed out: a same-layout resume re-reads that one window, re-plans
it (a pure function of the window) and goes on at the next batch, exactly. The batching
(``audio:N:bound:window`` or ``items``) is part of the layout: a resume under another budget, bound
or window, or between fixed-count and bucketed batches, takes the catch-up path below, whose
unread positions of the current window are the ones outside ``mask``, so every sample is still
read once (the catch-up list is then batched the new way).

Remote shards (:func:`scaling.data.shards.is_remote`: ``pipe:`` commands and http(s) URLs, opened by
webdataset's ``gopen``). A stream cannot seek, so a run that starts inside a remote shard reads the
shard from its start and drops the samples before the run's first (a read of the skipped bytes,
not a decode). That happens once per resume, and once per epoch for each slot whose run starts
inside a shard; runs that continue where the last one stopped reuse the open stream, as for local
shards. Counts come from the shard set's index, which remote shards must have. A stream that
fails or ends early is handled like a truncated local shard (warned, counted as
``truncated_lost``, subject to ``data.max_bad_fraction``); webdataset runs curl with ``--retry 30``.

``data.train_shards == "synthetic"``: an infinite synthetic source (sum of sinusoids for speech,
rectangles on gradients for vision, a Markov chain for text), deterministic per
``(seed, global sample index)``. Synthetic "epochs" are blocks of ``synthetic_epoch_size``
global indices and slot s takes the indices ``s (mod slots)``, so any world size sees the same
global batches (the engine tests compare sharded runs to one process with it). With
``data.synthetic_on_device`` the same stream (indices, epochs, speech lengths, batching, resume
state) is kept but every batch is made in one go on the training device, with random content
(:mod:`scaling.data.device`): for model-speed measurements.

The device (``build_loader(device=...)``). For a CUDA device batches are handed out in pinned
memory (the DataLoader's ``pin_memory``, or pinned in this process without workers), so the
``non_blocking`` copies of :func:`scaling.data.device.to_device` overlap with compute, and vision
batches hold uint8 images that to_device finishes on the GPU (``data.device_stage``).
"""

from __future__ import annotations

import collections
import copy
import io
import logging
import re
import tarfile
import warnings
import zlib
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data import bucketing, partition
from scaling.data.collate import BOS_ID, EOS_ID, SampleProcessor
from scaling.data.quality import STAT_NAMES, BadSample, DataCounters, check_bad_fraction
from scaling.data.shards import check_shard_set, expand_shards, is_remote, shard_name
from scaling.masking import sample_rng
from scaling.modalities import build_processor, spec_for

__all__ = ["Loader", "build_loader", "sample_id", "BOS_ID", "EOS_ID", "CATCHUP"]

log = logging.getLogger("scaling.data")

STATE_VERSION = 2
# What a resume must match for the exact path (else the catch-up); states from before bucketed
# batching have no "batching" key and were fixed-count.
_LAYOUT_KEYS = ("world_size", "workers", "window", "batching")
_STATE_DEFAULTS = {"batching": "items"}
DEFAULT_SYNTHETIC_EPOCH_SIZE = 100_000
CATCHUP = -1  # the segment id of the catch-up list after a resume on another layout

# Tags that separate the RNG streams drawn from the same seed.
_TAG_WINDOW = 0x5348_5546
_TAG_SYNTH = 0x5359_4E54
_TAG_MARKOV = 0x4D41_524B


def sample_id(shard_path: str, key: str) -> int:
    """Stable id of a webdataset sample: crc32 of ``<shard name>/<__key__>`` (the name is the basename
    of a local shard, and the same name for a remote one: :func:`scaling.data.shards.shard_name`)."""
    return zlib.crc32(f"{shard_name(shard_path)}/{key}".encode())


# ============================================================================= tar reading
_META = re.compile(r"__[^/]*__($|/)")


def _is_member(name: str) -> bool:
    """The tar members webdataset's ``tar_file_iterator`` hands out (it skips ``__meta__`` names)."""
    return not _META.match(name)


def _grouped(path: str, fileobj) -> Iterator[dict]:
    """Samples of a tar stream read from its current position: webdataset's member iterator,
    grouped by key as webdataset's ``group_by_keys`` does. A truncated tar raises (tarfile.TarError,
    OSError or EOFError) and the sample being read when it ended is dropped."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    sample = None
    for member in tar_file_iterator(fileobj):  # its default handler re-raises
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        if sample is None or prefix != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": prefix, "__url__": path}
        suffix = suffix.lower()
        if suffix in sample:
            sample["__malformed__"] = f"member {member['fname']} appears twice"
        sample[suffix] = member["data"]
    if sample is not None:
        yield sample


def _sample_offsets(path: str) -> list[int]:
    """Byte offset of each sample's first tar header: a scan of the headers only (``r:`` mode seeks
    over member data). A truncated tar gives the offsets found before its end."""
    from webdataset.tariterators import base_plus_ext

    offsets, key = [], None
    try:
        with tarfile.open(path, "r:") as tf:
            while (m := tf.next()) is not None:
                tf.members = []  # keep memory flat on shards of many small samples
                if not m.isreg() or not _is_member(m.name):
                    continue
                prefix, _ = base_plus_ext(m.name)
                if prefix is not None and prefix != key:
                    offsets.append(m.offset)
                    key = prefix
    except (tarfile.TarError, OSError, EOFError):
        pass
    return offsets


def _close_stream(f) -> None:
    """Close a shard stream. A remote one (webdataset's ``Pipe``) closed before its end makes its
    command exit on a broken pipe, which ``Pipe.close`` reports as an OSError: expected here, since
    every read already checked the command's status."""
    try:
        f.close()
    except OSError:
        pass


class _TarReader:
    """Reads runs of samples from shards. A run that continues where the last one stopped reuses the
    open stream; any other start seeks to the sample's header (local shards) or reads the stream
    from its start and skips the samples before it (remote shards, which cannot seek: a read of
    the skipped bytes). Per-process (each worker has its own)."""

    def __init__(self):
        self._offsets: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._truncated_at: dict[str, int] = {}
        self._open: Optional[tuple[str, int, Iterator[dict], object]] = None  # path, next sample, samples, file

    def close(self) -> None:
        if self._open is not None:
            _close_stream(self._open[3])
            self._open = None

    def _offsets_of(self, path: str) -> list[int]:
        if path not in self._offsets:
            self._offsets[path] = _sample_offsets(path)
            while len(self._offsets) > 64:
                self._offsets.popitem(last=False)
        return self._offsets[path]

    def read(self, path: str, lo: int, hi: int) -> tuple[list[dict], Optional[int]]:
        """Samples ``lo..hi-1`` of the shard, and the position where the shard turned out to end
        early if that is inside ``[lo, hi)`` (None otherwise). Fewer samples than asked for means
        the tar ends before its index's count: truncated (smaller than indexed) or damaged."""
        known_end = self._truncated_at.get(path)
        if known_end is not None and lo >= known_end:
            return [], None  # reported where the shard ends, in the run that holds that position
        if self._open is not None and self._open[:2] == (path, lo):
            samples, f = self._open[2], self._open[3]
        elif is_remote(path):
            self.close()
            f, samples, skipped, error = self._open_remote(path, lo)
            if skipped < lo:  # as a local shard whose readable samples end before lo
                _close_stream(f)
                why = f"its stream ends after {skipped} samples ({repr(error) if error else 'end of archive'})"
                return [], self._truncated(path, lo, hi, why)
        else:
            self.close()
            f = open(path, "rb")
            if lo > 0:
                offsets = self._offsets_of(path)
                if lo >= len(offsets):
                    f.close()
                    return [], self._truncated(path, lo, hi, "its readable samples end before this one")
                f.seek(offsets[lo])
            samples = _grouped(path, f)
        out: list[dict] = []
        error = None
        try:
            while len(out) < hi - lo:
                out.append(next(samples))
        except StopIteration:
            pass
        except (tarfile.TarError, OSError, EOFError) as exn:
            error = exn
        if len(out) < hi - lo:
            _close_stream(f)
            self._open = None
            return out, self._truncated(path, lo + len(out), hi, repr(error) if error else "end of archive")
        self._open = (path, hi, samples, f)
        return out, None

    @staticmethod
    def _open_remote(path: str, lo: int):
        """A remote shard's stream (webdataset's ``gopen``: ``pipe:`` commands, http(s) through curl)
        positioned at sample ``lo`` by reading and dropping the samples before it. Returns
        ``(stream, samples, how many were skipped, the error that stopped the skip or None)``."""
        from webdataset.gopen import gopen

        try:
            f = gopen(path, "rb")
        except OSError as exn:
            return io.BytesIO(), iter(()), 0, exn
        samples = _grouped(path, f)
        skipped = 0
        try:
            while skipped < lo:
                next(samples)
                skipped += 1
        except StopIteration:
            return f, samples, skipped, None
        except (tarfile.TarError, OSError, EOFError) as exn:
            return f, samples, skipped, exn
        return f, samples, skipped, None

    def _truncated(self, path: str, at: int, hi: int, why: str) -> int:
        self._truncated_at[path] = min(at, self._truncated_at.get(path, at))
        log.warning("shard %s ends after %d samples (%s); skipping its samples %d..%d", path, at, why, at, hi - 1)
        return at


class _Lost:
    """A position of a truncated shard: never read; ``first`` marks where the shard ended."""

    __slots__ = ("shard", "first")

    def __init__(self, shard: str, first: bool):
        self.shard, self.first = shard, first


# ============================================================================= sources
class _ShardSource:
    """Samples of a slot's segments, read from tar shards (see the module docstring)."""

    def __init__(self, paths: list[str], counts: list[int], seed: int, window: int, max_sample_bytes: int):
        self.paths = list(paths)
        self.names = [shard_name(p) for p in paths]
        self.counts = [int(n) for n in counts]
        self.num_samples = sum(self.counts)
        self.seed = seed
        self.window = max(1, int(window))
        self.max_sample_bytes = int(max_sample_bytes)
        self.catchup: list[partition.Interval] = []
        self.after_catchup = 0
        self._reader: Optional[_TarReader] = None

    def describe(self) -> str:
        crc = zlib.crc32("\n".join(self.names).encode())
        return f"shards:{len(self.paths)}:{self.num_samples}:{crc:08x}"

    def intervals(self, seg: int, slot: int, num_slots: int) -> list[partition.Interval]:
        work = self.catchup if seg == CATCHUP else [(seg, 0, self.num_samples)]
        return partition.split(work, num_slots, slot)

    def next_segment(self, seg: int) -> int:
        return self.after_catchup if seg == CATCHUP else seg + 1

    def window_order(self, seg: int, slot: int, num_slots: int, w: int, size: int) -> np.ndarray:
        """The shuffled order of window ``w`` (``size`` positions) of a slot's segment."""
        return np.random.default_rng([self.seed, _TAG_WINDOW, seg + 1, slot, num_slots, w]).permutation(size)

    def unread(self, seg: int, slot: int, num_slots: int, raw: int, done: Optional[int] = None) -> list[partition.Interval]:
        """The positions of a slot's segment not yet handed out at cursor position ``raw``: the
        current window's positions after ``raw`` in shuffled order (the sample at ``raw`` included,
        a partly handed-out document is read again) and every later window. ``done`` (bucketed
        batches, where ``raw`` is the window's start): a bit mask of the window's shuffled indices
        already handed out; the window's other positions are the unread ones."""
        ivs = self.intervals(seg, slot, num_slots)
        n, B = partition.total(ivs), self.window
        a = raw // B * B
        b = min(n, a + B)
        if a >= n:
            return []
        order = self.window_order(seg, slot, num_slots, a // B, b - a)
        pending = range(raw - a, b - a) if done is None else [j for j in range(b - a) if not done >> j & 1]
        rest = sorted(a + int(order[j]) for j in pending)
        out: list[partition.Interval] = []
        for p in rest:  # runs of consecutive positions, as intervals
            (epoch, start, stop), = partition.window(ivs, p, p + 1)
            if out and out[-1][0] == epoch and out[-1][2] == start:
                out[-1] = (epoch, out[-1][1], stop)
            else:
                out.append((epoch, start, stop))
        return out + partition.after(ivs, b)

    def windows(self, slot: int, num_slots: int, seg: int, raw_start: int) -> Iterator[tuple[int, int, list]]:
        """``(segment, first position, [(epoch, raw sample or _Lost)] in shuffled order)`` of each
        shuffle window that holds positions from ``raw_start`` on, forever."""
        if self._reader is None:
            self._reader = _TarReader()
        B = self.window
        while True:
            ivs = self.intervals(seg, slot, num_slots)
            n = partition.total(ivs)
            for w in range(raw_start // B, -(-n // B)):
                a, b = w * B, min(n, (w + 1) * B)
                if b <= raw_start:
                    continue  # the cursor is at the segment's end
                entries = self._read(partition.window(ivs, a, b))
                perm = self.window_order(seg, slot, num_slots, w, b - a)
                yield seg, a, [entries[j] for j in perm]
            raw_start = 0
            seg = self.next_segment(seg)

    def stream(self, slot: int, num_slots: int, seg: int, raw_start: int) -> Iterator[tuple[int, int, int, object]]:
        """``(segment, position, epoch, raw sample or _Lost)`` from the cursor on, forever."""
        for s, a, entries in self.windows(slot, num_slots, seg, raw_start):
            # Segments only move forward, so only the cursor's own window starts inside.
            for j in range(max(raw_start - a, 0) if s == seg else 0, len(entries)):
                epoch, entry = entries[j]
                yield s, a + j, epoch, entry

    def _read(self, ivs: list[partition.Interval]) -> list[tuple[int, object]]:
        entries: list[tuple[int, object]] = []
        for epoch, start, stop in ivs:
            order = partition.shard_order(self.seed, epoch, len(self.paths))
            for shard, lo, hi in partition.pieces(start, stop, order, self.counts):
                got, ended_at = self._reader.read(self.paths[shard], lo, hi)
                entries += [(epoch, raw) for raw in got]
                entries += [(epoch, _Lost(self.names[shard], k == ended_at)) for k in range(lo + len(got), hi)]
        return entries

    def item_size(self, proc: SampleProcessor, entry) -> int:
        """The length of the item a sample will give (bucketed batches), without decoding it when its
        metadata says; 0 when it will give none (lost, oversized, malformed, bad)."""
        if isinstance(entry, _Lost) or "__malformed__" in entry:
            return 0
        if sum(len(v) for k, v in entry.items() if not k.startswith("__")) > self.max_sample_bytes:
            return 0
        try:
            return proc.item_size(entry)
        except Exception as exn:  # a bug, not bad data (that gives 0): name the sample, as items() does
            exn.add_note(f"while sizing sample {entry['__key__']!r} of shard {entry['__url__']}")
            raise

    def items(self, proc: SampleProcessor, entry, epoch: int, counters: DataCounters, count: bool) -> list[dict]:
        if isinstance(entry, _Lost):
            if count:
                counters.add(epoch, "read")
                counters.add(epoch, "truncated_lost", shard=entry.shard)
                counters.add(epoch, "truncated_shard", int(entry.first), shard=entry.shard)
            return []
        url, key = entry["__url__"], entry["__key__"]
        shard = shard_name(url)
        try:
            size = sum(len(v) for k, v in entry.items() if not k.startswith("__"))
            if size > self.max_sample_bytes:
                raise BadSample("oversized", f"{size} bytes > data.max_sample_bytes {self.max_sample_bytes}")
            if "__malformed__" in entry:
                raise BadSample("malformed", entry["__malformed__"])
            items = proc.from_raw(entry, epoch, sample_id(url, key))
        except BadSample as exn:
            if count:
                counters.add(epoch, "read")
                counters.add(epoch, exn.kind, shard=shard)
                log.warning("skipping bad sample %r in shard %s (%s): %s", key, url, exn.kind, exn)
            return []
        except Exception as exn:
            # Not bad data (the processors turn every codec error into BadSample) but a bug: it stops
            # the run, and the traceback names the sample that met it.
            exn.add_note(f"while processing sample {key!r} of shard {url}")
            raise
        if count:
            counters.add_good(epoch, len(items))
        return items


class _SyntheticSource:
    """Synthetic samples with learnable structure, deterministic per (seed, global index)."""

    def __init__(self, data_cfg: DataConfig, model_cfg: ModelConfig, seed: int, epoch_size: int):
        self.data_cfg, self.model_cfg = data_cfg, model_cfg
        self.seed = seed
        self.epoch_size = int(epoch_size)
        self.num_samples = self.epoch_size
        # Bucketed batches sort windows of this many positions (the synthetic stream has no shuffle window).
        self.bucket_window = max(1, int(data_cfg.shuffle_buffer))
        self.spec = spec_for(model_cfg.modality)
        self.cache: dict = {}  # what a modality's synthetic samples draw once per source (text: its Markov chain)

    def describe(self) -> str:
        return f"synthetic:{self.epoch_size}"

    def stream(self, slot: int, num_slots: int, seg: int, raw_start: int) -> Iterator[tuple[int, int, int, object]]:
        epoch = seg
        while True:
            g0 = epoch * self.epoch_size + slot
            for r in range(raw_start, len(range(slot, self.epoch_size, num_slots))):
                yield epoch, r, epoch, g0 + r * num_slots
            raw_start = 0
            epoch += 1

    def windows(self, slot: int, num_slots: int, seg: int, raw_start: int) -> Iterator[tuple[int, int, list]]:
        """As :meth:`_ShardSource.windows`, over windows of ``bucket_window`` positions."""
        K, epoch = self.bucket_window, seg
        while True:
            g0, n = epoch * self.epoch_size + slot, len(range(slot, self.epoch_size, num_slots))
            for a in range(raw_start // K * K, n, K):
                if min(n, a + K) > raw_start:
                    yield epoch, a, [(epoch, g0 + r * num_slots) for r in range(a, min(n, a + K))]
            raw_start = 0
            epoch += 1

    def item_size(self, proc: SampleProcessor, g: int) -> int:
        from scaling.modalities.speech import synthetic_length  # batches bounded by audio are speech's

        return min(synthetic_length(self.data_cfg, sample_rng(self.seed, g, _TAG_SYNTH)), self.data_cfg.speech.max_samples)

    def items(self, proc: SampleProcessor, g: int, epoch: int, counters: DataCounters, count: bool) -> list[dict]:
        decoded, label = self.spec.synthetic_sample(self, sample_rng(self.seed, g, _TAG_SYNTH))
        items = proc.items(decoded, epoch, g, label)
        if count:
            counters.add_good(epoch, len(items))
        return items


# ============================================================================= one slot
class _Batching(NamedTuple):
    """How a slot cuts its items into batches. ``max_audio`` 0: ``max_items`` items per batch.
    ``max_audio`` > 0: length-bucketed batches of at most ``max_audio`` padded samples of audio and
    at most ``max_items`` items (0: no bound), sorted inside windows of ``window`` positions."""

    max_items: int
    max_audio: int = 0
    window: int = 1

    def describe(self) -> str:
        """What the resume state records: a fixed-count cursor resumes under any ``max_items``; a
        bucketed one only under the same budget, bound and window."""
        return "items" if not self.max_audio else f"audio:{self.max_audio}:{self.max_items}:{self.window}"


class _SegmentGuard:
    """Where a slot's stream ends: at ``stop_epoch`` (finite passes), or with an error once two whole
    segments went by without one usable sample (all bad), instead of looping for ever."""

    def __init__(self, source, slot: int, num_slots: int, seg0: int, stop_epoch: Optional[int]):
        self.source, self.slot, self.num_slots, self.stop_epoch = source, slot, num_slots, stop_epoch
        self.seg, self.idle = seg0, 0  # idle: segments entered since the last usable sample

    def stop_at(self, seg: int) -> bool:
        if seg == self.seg:
            return False
        self.seg, self.idle = seg, self.idle + 1
        if self.stop_epoch is not None and seg >= self.stop_epoch:
            return True
        if self.idle > 2:
            raise RuntimeError(f"slot {self.slot} of {self.num_slots} (rank x worker) got no usable sample in two "
                               f"whole epochs ({self.source.describe()}); are all its samples bad?")
        return False


def _slot_batches(source, proc: SampleProcessor, slot: int, num_slots: int, worker: int, cursor, counters_state,
                  batching: _Batching, stop_epoch: Optional[int]):
    """A slot's batches from ``cursor`` on: ``(worker, batch, cursor after it, counters, epoch)``.

    ``stop_epoch``: end (with a last, possibly short batch) where that epoch would start."""
    if batching.max_audio:
        yield from _bucketed_batches(source, proc, slot, num_slots, worker, cursor, counters_state, batching, stop_epoch)
        return
    micro_batch_size = batching.max_items
    counters = DataCounters(counters_state)
    seg0, raw0, sub0 = cursor
    items: list[dict] = []
    epoch = seg0
    guard = _SegmentGuard(source, slot, num_slots, seg0, stop_epoch)
    for seg, raw, epoch, entry in source.stream(slot, num_slots, seg0, raw0):
        if guard.stop_at(seg):
            break
        resumed = (seg, raw) == (seg0, raw0) and sub0 > 0  # this sample was counted before the checkpoint
        produced = source.items(proc, entry, epoch, counters, count=not resumed)
        for sub in range(sub0 if resumed else 0, len(produced)):
            guard.idle = 0
            items.append(produced[sub])
            if len(items) == micro_batch_size:
                # The cursor names the next item: past a finished sample, the next position.
                after = (seg, raw, sub + 1) if sub + 1 < len(produced) else (seg, raw + 1, 0)
                yield worker, proc.collate(items), after, counters.state_dict(), epoch
                items = []
    if items:
        yield worker, proc.collate(items), None, counters.state_dict(), epoch


def _bucketed_batches(source, proc: SampleProcessor, slot: int, num_slots: int, worker: int, cursor, counters_state,
                      batching: _Batching, stop_epoch: Optional[int]):
    """:func:`_slot_batches` for length-bucketed batches (module docstring, "Bucketed speech batches").

    The cursor is ``(segment, window start, next batch of the window, mask)``: ``mask`` (hex) has
    bit ``j`` set when the window's shuffled sample ``j`` was handed out, which a resume on another
    layout needs (:meth:`_ShardSource.unread`). A window's samples are decoded batch by batch, and
    counted when their batch is made, as in fixed-count batches."""
    counters = DataCounters(counters_state)
    seg0, a0, next0 = (int(v) for v in cursor[:3])
    done0 = int(cursor[3], 16) if len(cursor) > 3 else 0
    # a window's start (or the segment's end, after its last window) and, inside a window, its mask
    assert next0 == 0 or (len(cursor) > 3 and a0 % batching.window == 0), cursor
    guard = _SegmentGuard(source, slot, num_slots, seg0, stop_epoch)
    for seg, a, entries in source.windows(slot, num_slots, seg0, a0):
        if guard.stop_at(seg):
            break
        resumed = (seg, a) == (seg0, a0)
        sizes = [source.item_size(proc, entry) for _, entry in entries]
        plan = bucketing.plan_window(sizes, batching.max_audio, batching.max_items)
        order = bucketing.batch_order(source.seed, seg, slot, num_slots, a // batching.window, len(plan))
        done = done0 if resumed else 0
        for k in range(next0 if resumed else 0, len(plan)):
            items: list[dict] = []
            for j in plan[order[k]]:
                epoch, entry = entries[j]
                got = source.items(proc, entry, epoch, counters, count=True)
                assert all(proc.item_length(it) == sizes[j] for it in got), (sizes[j], [proc.item_length(it) for it in got])
                items += got
                done |= 1 << j
            after = (seg, a, k + 1, f"{done:x}") if k + 1 < len(plan) else (seg, a + len(entries), 0, "0")
            if items:  # a batch of bad samples only gives nothing; the next batch's cursor covers it
                guard.idle = 0
                yield worker, proc.collate(items), after, counters.state_dict(), epoch


class _WorkerSlots(torch.utils.data.IterableDataset):
    """DataLoader worker ``p`` runs the slot of logical worker ``(p + first) % workers``: the
    DataLoader's round-robin always starts at worker 0, and a resumed loader must start at ``first``."""

    def __init__(self, source, proc, rank: int, workers: int, num_slots: int, cursors, counters, first: int,
                 batching: _Batching, stop_epoch: Optional[int]):
        super().__init__()
        self.source, self.proc = source, proc
        self.rank, self.workers, self.num_slots = rank, workers, num_slots
        self.cursors, self.counters, self.first = cursors, counters, first
        self.batching, self.stop_epoch = batching, stop_epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = ((0 if info is None else info.id) + self.first) % self.workers
        return _slot_batches(self.source, self.proc, self.rank * self.workers + w, self.num_slots, w,
                             self.cursors[w], self.counters[w], self.batching, self.stop_epoch)


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


# ============================================================================= loader
class Loader:
    """Iterator of micro-batches (dict of CPU tensors) with exact resume; infinite unless ``epochs``.

    ``state_dict()`` holds plain ints/strings only (safe for ``torch.load(weights_only=True)``).
    ``epoch``: the epoch of the last item handed out (the start epoch before the first batch).
    ``max_batch_audio_samples`` > 0: length-bucketed batches (see :func:`build_loader`)."""

    def __init__(self, source, proc: SampleProcessor, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, num_workers: int = 0, epochs: Optional[int] = None,
                 max_bad_fraction: float = 1.0, bad_check_min_samples: int = 0, max_batch_audio_samples: int = 0,
                 pin_memory: bool = False):
        if max_batch_audio_samples < 0:
            raise ValueError(f"max_batch_audio_samples must be >= 0 (0: fixed-count batches), got {max_batch_audio_samples}")
        if micro_batch_size < 0 or (micro_batch_size == 0 and not max_batch_audio_samples):
            raise ValueError("micro_batch_size must be positive (or 0 = no bound, with max_batch_audio_samples)")
        self.source, self.proc = source, proc
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.micro_batch_size = micro_batch_size
        window = getattr(source, "window", None) or getattr(source, "bucket_window", 1)
        self.batching = _Batching(int(micro_batch_size), int(max_batch_audio_samples), int(window))
        self.num_workers = int(num_workers)
        self.workers = max(1, self.num_workers)
        self.num_slots = world_size * self.workers
        if source.num_samples < self.num_slots:
            raise ValueError(f"the data has {source.num_samples} samples per epoch ({source.describe()}), fewer than "
                             f"the {self.num_slots} slots of world_size {world_size} x {self.workers} workers: "
                             "some ranks or workers would get none; use fewer data.num_workers or more data")
        self.epochs = epochs
        self.max_bad_fraction, self.bad_check_min_samples = max_bad_fraction, bad_check_min_samples
        # Batches in page-locked memory, so that copies to a GPU are asynchronous (build_loader asks for it on CUDA).
        self.pin_memory = bool(pin_memory)
        # Without workers there is no DataLoader pin thread: __next__ pins (pinning needs a CUDA device).
        self._pin_here = self.pin_memory and self.num_workers == 0 and torch.cuda.is_available()
        self.epoch = 0
        self._cursors = [(0, 0, 0)] * self.workers
        self._counters: list[dict] = [{}] * self.workers
        self._next_worker = 0
        self._it = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        worker, batch, cursor, counters, epoch = next(self._it)
        assert worker == self._next_worker or self.epochs is not None, (worker, self._next_worker)
        if self._pin_here:
            batch = {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in batch.items()}
        if cursor is not None:
            self._cursors[worker] = tuple(cursor)  # the DataLoader's pin thread hands tuples back as lists
        self._counters[worker] = counters
        self._next_worker = (worker + 1) % self.workers
        self.epoch = epoch
        return batch

    def _start(self):
        # Free functions and a dataset object, not methods: a generator referencing the Loader would
        # form a cycle, and DataLoader workers would then be shut down only by the cyclic GC.
        if self.num_workers == 0:
            return _slot_batches(self.source, self.proc, self.rank, self.num_slots, 0, self._cursors[0],
                                 self._counters[0], self.batching, self.epochs)
        return iter(self._dataloader())

    def _dataloader(self) -> torch.utils.data.DataLoader:
        """The DataLoader over this rank's worker slots from the current state (workers > 0); its
        workers start when it is iterated."""
        return torch.utils.data.DataLoader(
            _WorkerSlots(self.source, self.proc, self.rank, self.workers, self.num_slots, list(self._cursors),
                         list(self._counters), self._next_worker, self.batching, self.epochs),
            batch_size=None, num_workers=self.num_workers, collate_fn=_identity, worker_init_fn=_worker_init,
            # A private generator: creating the DataLoader must not consume the global RNG.
            generator=torch.Generator().manual_seed(self.seed), prefetch_factor=2, persistent_workers=False,
            pin_memory=self.pin_memory)

    def close(self) -> None:
        """Stop the stream (and its DataLoader workers, if any) now; iteration may resume."""
        if self._it is not None:
            if hasattr(self._it, "close"):
                self._it.close()
            elif hasattr(self._it, "_shutdown_workers"):
                self._it._shutdown_workers()
            self._it = None

    # ------------------------------------------------------------------ counters
    def counters(self) -> DataCounters:
        """This rank's counters, summed over its workers."""
        return DataCounters.merge(DataCounters(c) for c in self._counters)

    def stats(self) -> torch.Tensor:
        """This rank's counts in :data:`scaling.data.quality.STAT_NAMES` order (float64, to be all-reduced)."""
        totals = self.counters().totals()
        return torch.tensor([float(totals[k]) for k in STAT_NAMES], dtype=torch.float64)

    def check_bad_fraction(self, job_totals: dict[str, float]) -> None:
        """Raises BadDataError when the job-wide counts (``stats()`` summed over ranks, by name) have
        too many bad samples."""
        check_bad_fraction(job_totals, self.counters().bad_by_shard, max_fraction=self.max_bad_fraction,
                           min_samples=self.bad_check_min_samples, rank=self.rank)

    # ------------------------------------------------------------------ state
    def _layout(self) -> dict:
        return {"seed": int(self.seed), "world_size": int(self.world_size), "workers": int(self.workers),
                "window": int(getattr(self.source, "window", 1)), "source": self.source.describe(),
                "modality": self.proc.modality, "batching": self.batching.describe()}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": int(self.rank),
            **self._layout(),
            "epoch": int(self.epoch),
            # ints, and a bucketed cursor's hex mask of the window's handed-out samples
            "cursors": [[v if isinstance(v, str) else int(v) for v in c] for c in self._cursors],
            "counters": [dict(c) for c in self._counters],
            "next_worker": int(self._next_worker),
            "catchup": [list(map(int, iv)) for iv in getattr(self.source, "catchup", [])],
            "after_catchup": int(getattr(self.source, "after_catchup", 0)),
        }

    def _check(self, d: dict, keys: tuple[str, ...]) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {d.get('version')} != {STATE_VERSION}")
        mine = {**self._layout(), "rank": self.rank}
        for k in keys:
            if d.get(k, _STATE_DEFAULTS.get(k)) != mine[k]:
                raise ValueError(f"loader state has {k}={d.get(k)!r} but this loader has {k}={mine[k]!r}; "
                                 "resuming on other data is not supported")

    def same_layout(self, d: dict) -> bool:
        """Whether a saved state has this loader's world size, worker count, shuffle window and batching."""
        return all(d.get(k, _STATE_DEFAULTS.get(k)) == v for k, v in self._layout().items() if k in _LAYOUT_KEYS)

    def load_state_dict(self, d: dict) -> None:
        """Exact resume on the same layout (world size, workers, shuffle window, batching)."""
        self._check(d, ("seed", "source", "modality", *_LAYOUT_KEYS, "rank"))
        self._cursors = [tuple(v if isinstance(v, str) else int(v) for v in c) for c in d["cursors"]]
        self._counters = [dict(c) for c in d["counters"]]
        self._next_worker = int(d["next_worker"])
        self.epoch = int(d["epoch"])
        if isinstance(self.source, _ShardSource):
            self.source.catchup = [tuple(iv) for iv in d["catchup"]]
            self.source.after_catchup = int(d["after_catchup"])
        self.close()  # the stream is re-created from the new position at the next batch

    def load_job_state(self, states: list[dict]) -> None:
        """Resume from every rank's state of a checkpoint: exact on the same layout, else the
        catch-up of the module docstring, with a warning."""
        if not states:
            raise ValueError("no loader state to resume from")
        for d in states:
            self._check(d, ("seed", "source", "modality"))
        old = {k: states[0].get(k, _STATE_DEFAULTS.get(k)) for k in _LAYOUT_KEYS}
        if self.same_layout(states[0]):
            mine = [d for d in states if d.get("rank") == self.rank]
            if len(mine) != 1:
                raise ValueError(f"the checkpoint has no loader state of rank {self.rank}")
            return self.load_state_dict(mine[0])
        if not isinstance(self.source, _ShardSource):
            raise ValueError(f"the synthetic source resumes only on its own layout {old}, not {self._layout()}")
        ranks = sorted(int(d["rank"]) for d in states)
        if ranks != list(range(old["world_size"])):
            raise ValueError(f"a layout change needs the loader states of all {old['world_size']} old ranks, got ranks {ranks}")
        old_source = copy.copy(self.source)
        old_source.window = old["window"]
        num_old = old["world_size"] * old["workers"]
        slots, partial, counters = [], 0, []
        for d in states:
            old_source.catchup = [tuple(iv) for iv in d["catchup"]]
            old_source.after_catchup = int(d["after_catchup"])
            for w, cursor in enumerate(d["cursors"]):
                seg, raw, sub = (int(v) for v in cursor[:3])
                done = int(cursor[3], 16) if len(cursor) > 3 else None  # a bucketed cursor: the window's mask
                slot = int(d["rank"]) * old["workers"] + w
                partial += sub > 0 and done is None
                slots.append({"slot": slot, "num_slots": num_old,
                              "unread": old_source.unread(seg, slot, num_old, raw, done),
                              "next_epoch": old_source.next_segment(seg)})
            counters += [DataCounters(c) for c in d["counters"]]
        catchup, after = partition.leftover(slots, self.source.num_samples)
        self.source.catchup, self.source.after_catchup = catchup, after
        self._cursors = [(CATCHUP, 0, 0)] * self.workers
        # The job's counts so far go to one slot, so sums over the new job stay right.
        self._counters = [DataCounters.merge(counters).state_dict() if self.rank == 0 and w == 0 else {}
                          for w in range(self.workers)]
        self._next_worker = 0
        self.epoch = min(iv[0] for iv in catchup) if catchup else after
        self.close()
        batching = ("" if old["batching"] == self.batching.describe()
                    else f" (batching {old['batching']} -> {self.batching.describe()})")
        msg = (f"resuming the data stream on {self.world_size} ranks x {self.workers} workers from a checkpoint of "
               f"{old['world_size']} x {old['workers']}{batching}: the {partition.total(catchup)} samples it had not read "
               f"(epochs {self.epoch}..{after - 1}) are split over the new slots, then epoch {after} starts. "
               f"Nothing is skipped or read twice, except the rest of {partial} text documents the old slots "
               "were inside of (read again from their first block).")
        if self.rank == 0:
            warnings.warn(msg)
        log.warning(msg)


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
    epochs: Optional[int] = None,
    max_batch_audio_samples: int = 0,
    device: torch.device | str = "cpu",
) -> Loader:
    """The loader of one rank (see the module docstring); infinite, or ``epochs`` whole epochs.

    Shards are checked against their indexes first (:func:`scaling.data.shards.check_shard_set`).
    ``synthetic_epoch_size`` (synthetic source only): global samples per synthetic epoch
    (default 100,000); tests use a small one to cross epoch boundaries.

    ``max_batch_audio_samples`` (speech): 0 gives batches of ``micro_batch_size`` utterances; > 0
    gives length-bucketed batches of at most that many samples of padded audio (utterances x the
    longest one), each with at most ``micro_batch_size`` utterances (0: no bound). It must be at
    least ``data.speech.max_samples``, so the longest clip fits a batch on its own.

    ``device``: the training device the batches go to, through :func:`scaling.data.device.to_device`.
    On CUDA, batches come in pinned memory and (``data.device_stage``) vision batches hold uint8
    images plus flip flags that to_device finishes on the GPU; on CPU they are finished float batches.
    ``data.synthetic_on_device`` (with ``train_shards=synthetic``) makes the batches on this device,
    without workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    if max_batch_audio_samples:
        if model_cfg.modality != "speech":
            raise ValueError(f"max_batch_audio_samples (train.micro_batch_seconds) bounds speech batches; "
                             f"model.modality is {model_cfg.modality!r}")
        if max_batch_audio_samples < data_cfg.speech.max_samples:
            raise ValueError(f"max_batch_audio_samples {max_batch_audio_samples} (train.micro_batch_seconds x "
                             f"data.speech.sample_rate) < data.speech.max_samples {data_cfg.speech.max_samples}: "
                             "the longest clip would not fit a micro-batch; raise train.micro_batch_seconds or "
                             "lower data.speech.max_samples")
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    num_workers = data_cfg.num_workers
    if data_cfg.synthetic_on_device:
        if data_cfg.train_shards.strip() != "synthetic":
            raise ValueError(f"data.synthetic_on_device makes synthetic batches; it needs data.train_shards=synthetic, "
                             f"not {data_cfg.train_shards!r}")
        from scaling.data.device import DeviceBatchMaker, DeviceSyntheticSource

        proc = DeviceBatchMaker(data_cfg, model_cfg, masking_cfg, seed, device)
        source = DeviceSyntheticSource(data_cfg, model_cfg, seed, synthetic_epoch_size or DEFAULT_SYNTHETIC_EPOCH_SIZE)
        if num_workers:
            log.info("data.synthetic_on_device: data.num_workers=%d is not used (batches are made on %s)",
                     num_workers, device)
        num_workers = 0  # a worker process cannot hand out tensors that live on a GPU
    elif data_cfg.train_shards.strip() == "synthetic":
        proc = build_processor(data_cfg, model_cfg, masking_cfg, seed, device_stage=data_cfg.device_stage and on_gpu)
        source = _SyntheticSource(data_cfg, model_cfg, seed, synthetic_epoch_size or DEFAULT_SYNTHETIC_EPOCH_SIZE)
    else:
        proc = build_processor(data_cfg, model_cfg, masking_cfg, seed, device_stage=data_cfg.device_stage and on_gpu)
        paths = expand_shards(data_cfg.train_shards)  # ValueError naming a missing shard
        # Before any training: shards vs their indexes (listed, sizes, modality) and, for text, the
        # tokenizer they were made with vs data.text.tokenizer (ValueError naming the files).
        tc = model_cfg.text
        counts = check_shard_set(paths, modality=model_cfg.modality, tokenizer=data_cfg.text.tokenizer or None,
                                 vocab_size=tc.vocab_size, pad_id=tc.pad_id, mask_id=tc.mask_id)
        # A shard without an index is counted from its tar headers (a partition needs every count).
        counts = [len(_sample_offsets(p)) if n is None else n for p, n in zip(paths, counts)]
        source = _ShardSource(paths, counts, seed, data_cfg.shuffle_buffer, data_cfg.max_sample_bytes)
    return Loader(source, proc, seed=seed, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                  num_workers=num_workers, epochs=epochs, max_bad_fraction=data_cfg.max_bad_fraction,
                  bad_check_min_samples=data_cfg.bad_check_min_samples,
                  max_batch_audio_samples=max_batch_audio_samples,
                  pin_memory=on_gpu and not data_cfg.synthetic_on_device)
