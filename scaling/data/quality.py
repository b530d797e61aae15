"""Bad input: the kinds of bad sample, their counters, and the bad-fraction stop.

A sample that cannot be used raises :class:`BadSample` with one of :data:`BAD_KINDS`; the loader
skips it, counts it per kind (per epoch, and per shard) and logs its shard and key. A shard whose
tar ends early is counted once as ``truncated_shard`` and the samples its index promised after
that point as ``truncated_lost``. Counters travel with the loader state, so they survive resume.

:class:`DataCounters` holds the counts of one (rank, worker) slot as plain ints keyed by strings
(safe for ``torch.load(weights_only=True)``). The trainer sums :meth:`Loader.stats` over ranks in
its one all-reduce per step and calls :func:`check_bad_fraction` with the job-wide totals, so every
rank decides to stop at the same step and no collective is left waiting.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["BadSample", "BadDataError", "BAD_KINDS", "SHARD_EVENTS", "STAT_NAMES", "DataCounters",
           "check_bad_fraction", "short_error"]

# Per-sample problems, in a fixed order (the trainer all-reduces a vector in this order).
BAD_KINDS = (
    "missing_field",      # no payload member of the modality (no flac/wav, png/jpg/webp, ids)
    "empty",              # a payload of zero bytes, zero audio frames or zero tokens
    "decode_error",       # the codec rejects the bytes (truncated image, garbage audio, ids not int32)
    "metadata_mismatch",  # the json member is unreadable or disagrees with the decoded payload
    "sample_rate",        # audio at another rate than data.speech.sample_rate
    "oversized",          # a sample of more than data.max_sample_bytes
    "too_large",          # decodes too big, from its header: data.vision.max_pixels, data.speech.max_seconds
    "too_short",          # audio shorter than data.speech.min_samples
    "non_finite",         # NaN or inf audio
    "bad_label",          # a cls member that is not an integer in [0, 2^63)
    "bad_tokens",         # token ids outside [0, model.text.vocab_size)
    "malformed",          # a member twice in one sample, or a member name without an extension
)
# Per-shard events: a tar that ends early, and the indexed samples it lost.
SHARD_EVENTS = ("truncated_shard", "truncated_lost")
# What Loader.stats() reports, in this order: positions read, good samples, items (text blocks), then the above.
STAT_NAMES = ("read", "good", "items") + BAD_KINDS + SHARD_EVENTS


class BadSample(ValueError):
    """A sample that cannot be used; ``kind`` is one of :data:`BAD_KINDS`."""

    def __init__(self, kind: str, message: str):
        assert kind in BAD_KINDS, kind
        super().__init__(message)
        self.kind = kind


def short_error(exn: BaseException, limit: int = 160) -> str:
    """A library error as one short line for a log or a summary: torchvision's and libsndfile's
    messages carry C++ source locations (``operator(), .../decode_png.cpp:79, Out of bound read``)."""
    msg = " ".join(str(exn).split()) or type(exn).__name__
    msg = re.sub(r"(?:[\w:~<>]+\(\), )?\S+\.(?:cpp|cc|c|h):\d+,?\s*", "", msg)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class BadDataError(RuntimeError):
    """Too many bad samples: the fraction passed ``data.max_bad_fraction``."""


class DataCounters:
    """Counts of one slot: ``by_epoch[str(epoch)][name]`` and bad samples per shard basename."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.by_epoch: dict[str, dict[str, int]] = {e: dict(c) for e, c in state.get("by_epoch", {}).items()}
        self.bad_by_shard: dict[str, int] = dict(state.get("bad_by_shard", {}))

    def add(self, epoch: int, name: str, n: int = 1, shard: str | None = None) -> None:
        assert name in STAT_NAMES, name
        if n == 0:
            return
        counts = self.by_epoch.setdefault(str(epoch), {})
        counts[name] = counts.get(name, 0) + int(n)
        if shard is not None and name in BAD_KINDS + SHARD_EVENTS:
            self.bad_by_shard[shard] = self.bad_by_shard.get(shard, 0) + int(n)

    def add_good(self, epoch: int, num_items: int) -> None:
        """One sample read and decoded into ``num_items`` training items."""
        for name, n in (("read", 1), ("good", 1), ("items", num_items)):
            self.add(epoch, name, n)

    def state_dict(self) -> dict:
        return {"by_epoch": {e: dict(c) for e, c in self.by_epoch.items()}, "bad_by_shard": dict(self.bad_by_shard)}

    @staticmethod
    def merge(counters: Iterable["DataCounters"]) -> "DataCounters":
        out = DataCounters()
        for c in counters:
            for e, counts in c.by_epoch.items():
                for name, n in counts.items():
                    out.add(int(e), name, n)
            for shard, n in c.bad_by_shard.items():
                out.bad_by_shard[shard] = out.bad_by_shard.get(shard, 0) + n
        return out

    def totals(self, epoch: int | None = None) -> dict[str, int]:
        """Counts over all epochs (or one), every name of :data:`STAT_NAMES` present."""
        out = dict.fromkeys(STAT_NAMES, 0)
        for e, counts in self.by_epoch.items():
            if epoch is None or int(e) == epoch:
                for name, n in counts.items():
                    out[name] += n
        return out


def check_bad_fraction(totals: dict[str, float], bad_by_shard: dict[str, int], *, max_fraction: float,
                       min_samples: int, rank: int) -> None:
    """Raises :class:`BadDataError` when the job-wide bad fraction passes ``max_fraction``.

    ``totals``: job-wide counts (:data:`STAT_NAMES`); ``bad_by_shard``: this rank's bad samples per
    shard, named in the message (worst first). The check waits for ``min_samples`` read samples,
    so a bad sample among the first few does not stop a run."""
    read = totals["read"]
    if read < min_samples or read <= 0:
        return
    bad = sum(totals[k] for k in BAD_KINDS) + totals["truncated_lost"]
    if bad / read <= max_fraction:
        return
    kinds = ", ".join(f"{k} {int(totals[k])}" for k in BAD_KINDS + SHARD_EVENTS if totals[k])
    worst = sorted(bad_by_shard.items(), key=lambda kv: (-kv[1], kv[0]))
    shards = ", ".join(f"{name} ({n})" for name, n in worst[:10]) + (" ..." if len(worst) > 10 else "")
    raise BadDataError(
        f"{int(bad)} of {int(read)} samples read were bad ({bad / read:.2%} > data.max_bad_fraction "
        f"{max_fraction:.2%}): {kinds}. Rank {rank} saw them in: {shards or 'no shard of its own'}. "
        "Fix or drop those shards (scaling-shards rebuilds a set), or raise data.max_bad_fraction.")
