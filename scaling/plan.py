"""From a recipe and a world size to what each rank does per optimizer step.

A recipe states the **global batch** of the published run (``train.global_batch_size`` samples, or
for speech ``train.global_batch_seconds`` of padded audio as fairseq's ``max_tokens`` counts it) and
the **most one device takes at once** (``train.micro_batch_size`` / ``train.micro_batch_seconds``).
:func:`resolve` turns that into micro-batch x accumulation x world size for the ranks at hand, so
the same recipe runs unchanged on 1 or 1,024 ranks:

- samples: the per-rank share ``global / world`` must be whole; the micro-batch is the largest
  divisor of it up to ``micro_batch_size`` and accumulation makes up the rest. When the world size
  does not divide the batch, the error names the world sizes that do and the batch sizes that would.
- seconds of audio: per rank ``global / world`` seconds, in ``ceil(share / micro_batch_seconds)``
  micro-batches of equal audio budget (fairseq's ``max_tokens`` per GPU, ``update_freq``); any world
  size works. The loader fills each micro-batch with length-bucketed clips up to that budget.

The recipe's step counts (``train.max_steps``, ``schedule.warmup_steps``, ``ema.anneal_steps``) and
its peak ``optim.lr`` are stated at ``train.reference_batch`` (0: the global batch itself). A run
with another global batch keeps the number of samples the schedule spans: every step count is scaled
by ``reference / global``; the peak LR is rescaled by ``optim.lr_scaling`` (``linear``: Goyal et al.
2017, arXiv 1706.02677; ``sqrt``: Krizhevsky 2014, arXiv 1404.5997, the usual rule for Adam) or
kept (``none``, with a note). :meth:`Plan.resolved` is the recipe with these values filled in and
``reference_batch`` set to the global batch, so resolving it again changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional

from scaling.config import Recipe, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's batch is split; the engines and the trainer read this."""

    global_batch: float  # in `unit`
    unit: str  # "samples" or "s of audio"
    micro_batch_size: int  # samples per micro-batch; with audio batches the most utterances in one (0: no bound)
    accumulation: int
    world_size: int
    micro_batch_audio_samples: int = 0  # audio batches: most padded audio samples per micro-batch, else 0

    @property
    def by_audio(self) -> bool:
        return self.micro_batch_audio_samples > 0

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step (fixed-count batches only)."""
        assert not self.by_audio, "an audio batch has no fixed sample count"
        return int(self.global_batch)

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int, sample_rate: int = 16000, *,
                    warn: bool = True) -> "BatchPlan":
        """The split of ``cfg``'s global batch on ``world_size`` ranks. A micro-batch well under
        ``train.micro_batch_size`` (see :meth:`small_micro_batch`) is a ``UserWarning`` unless ``warn``
        is False (:func:`resolve` reports it as a plan note instead, printed once by rank 0)."""
        if world_size < 1:
            raise ValueError(f"the world size must be at least 1, got {world_size}")
        if cfg.global_batch_seconds > 0:
            per_rank = cfg.global_batch_seconds / world_size
            accumulation = max(1, math.ceil(per_rank / cfg.micro_batch_seconds - 1e-9))
            audio = int(per_rank / accumulation * sample_rate)
            return cls(cfg.global_batch_seconds, "s of audio", cfg.micro_batch_size, accumulation, world_size, audio)
        batch = cfg.global_batch_size
        if batch % world_size:
            raise ValueError(f"train.global_batch_size ({batch}) must be a multiple of the world size ({world_size}): "
                             f"{_alternatives(batch, world_size)}")
        per_rank = batch // world_size
        micro = min(cfg.micro_batch_size, per_rank)
        while per_rank % micro:
            micro -= 1
        plan = cls(batch, "samples", micro, per_rank // micro, world_size)
        message = plan.small_micro_batch(cfg.micro_batch_size)
        if warn and message:
            warnings.warn(message, stacklevel=2)
        return plan

    def small_micro_batch(self, asked: int) -> Optional[str]:
        """Why the micro-batch is less than half of ``asked`` (train.micro_batch_size) while accumulation
        makes up the step (more, smaller passes than asked for), and which global batches split evenly;
        None when it is not. A share that fits one micro-batch (accumulation 1) costs nothing."""
        if self.by_audio or self.accumulation == 1 or 2 * self.micro_batch_size >= asked:
            return None
        per_rank = self.global_batch_size // self.world_size
        return (f"micro-batch {self.micro_batch_size} x accumulation {self.accumulation} per rank, well under "
                f"train.micro_batch_size ({asked}): train.global_batch_size {self.global_batch_size} on "
                f"{self.world_size} ranks is {per_rank} samples per rank, which no size from "
                f"{self.micro_batch_size + 1} to {asked} divides; train.global_batch_size "
                f"{_even_batches(self.global_batch_size, self.world_size, asked)} would split evenly into "
                f"micro-batches of {asked} on {self.world_size} ranks")

    def __str__(self) -> str:
        if self.by_audio:
            return (f"global batch {self.global_batch:g} s of audio = micro {self.micro_batch_audio_samples} audio "
                    f"samples (padded) x accumulation {self.accumulation} x world {self.world_size}")
        return (f"global batch {int(self.global_batch)} = micro {self.micro_batch_size} x "
                f"accumulation {self.accumulation} x world {self.world_size}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _alternatives(batch: int, world: int) -> str:
    """The world sizes nearest to ``world`` that divide ``batch``, and the batches nearest to it that ``world`` divides."""
    divisors = _divisors(batch)
    below = [d for d in divisors if d < world][-2:]
    above = [d for d in divisors if d > world][:2]
    sizes = ", ".join(str(d) for d in below + above)
    lower, upper = (batch // world) * world, (batch // world + 1) * world
    batches = " or ".join(str(b) for b in (lower, upper) if b > 0)
    return f"world sizes that divide it: {sizes}; or, on {world} ranks, train.global_batch_size {batches}"


def _even_batches(batch: int, world: int, micro: int) -> str:
    """The global batches nearest to ``batch`` that ``world`` ranks split into whole micro-batches of ``micro``."""
    step = world * micro
    lower = batch // step * step
    assert 0 < lower < batch, "asked only when the per-rank share exceeds micro and micro does not divide it"
    return f"{lower} or {lower + step}"


def _tokens_per_sample(recipe: Recipe) -> float:
    """Encoder positions per sample: what `tokens/s` counts (frames, patches + CLS, or token ids)."""
    from scaling.modalities import spec_for

    # Speech: the longest crop's frames (fixed-count batches pad to it at worst).
    return spec_for(recipe.model.modality).positions(recipe, None)


def frame_stride(recipe: Recipe) -> int:
    """Audio samples per encoder frame: the product of the CNN strides (320 for wav2vec 2.0's front-end)."""
    return math.prod(layer[2] for layer in recipe.model.speech.conv_layers)


@dataclass(frozen=True)
class Plan:
    batch: BatchPlan
    recipe: Recipe  # as loaded (step counts and LR at train.reference_batch)
    reference_batch: float
    lr: float
    max_steps: int
    warmup_steps: int
    anneal_steps: int
    samples_per_epoch: Optional[int]  # from the shard index; None when unknown (synthetic, no index)
    data: str  # what is read, in words
    precision: str  # train.precision with "auto" settled for this machine
    notes: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return self.batch.unit

    @property
    def tokens_per_step(self) -> float:
        if self.batch.by_audio:
            return self.batch.global_batch * self.recipe.data.speech.sample_rate / frame_stride(self.recipe)
        return self.batch.global_batch * _tokens_per_sample(self.recipe)

    @property
    def epochs(self) -> Optional[float]:
        if self.samples_per_epoch is None or self.batch.by_audio:
            return None
        return self.max_steps * self.batch.global_batch / self.samples_per_epoch

    def with_loader(self, loader) -> "Plan":
        """This plan with what the training loader reads: it has checked and counted the shards
        already (also those without an index), so start-up reads the indexes once."""
        source = loader.source
        if not hasattr(source, "paths"):  # the synthetic source
            return self
        spec = self.recipe.data.train_shards.strip()
        return dataclasses.replace(self, data=_shard_words(spec, len(source.paths), source.num_samples),
                                   samples_per_epoch=source.num_samples)

    def resolved(self) -> Recipe:
        """The recipe this plan trains: scaled step counts and LR, reference batch = the global batch."""
        r = self.recipe
        return dataclasses.replace(
            r,
            train=dataclasses.replace(r.train, max_steps=self.max_steps, reference_batch=self.batch.global_batch,
                                      precision=self.precision),
            schedule=dataclasses.replace(r.schedule, warmup_steps=self.warmup_steps),
            ema=dataclasses.replace(r.ema, anneal_steps=self.anneal_steps),
            optim=dataclasses.replace(r.optim, lr=self.lr),
        )

    def lines(self) -> list[str]:
        b = self.batch
        if b.by_audio:
            sr = self.recipe.data.speech.sample_rate
            micro = (f"micro-batch: at most {b.micro_batch_audio_samples} padded audio samples "
                     f"({b.micro_batch_audio_samples / sr:.1f} s) per rank, length-bucketed")
            per_step = f"per step: {b.global_batch:g} s of audio, about {self.tokens_per_step:,.0f} frames"
        else:
            micro = f"micro-batch: {b.micro_batch_size} samples per rank"
            per_step = f"per step: {int(b.global_batch)} samples, {self.tokens_per_step:,.0f} tokens"
        rescale = self.reference_batch != b.global_batch
        lr = f"peak LR: {self.lr:.4g}"
        if rescale:
            lr += (f" ({self.recipe.optim.lr:.4g} at reference batch {self.reference_batch:g}, "
                   f"rule {self.recipe.optim.lr_scaling})")
        sched = self.recipe.schedule
        warmup = (f"tri_stage {'/'.join(f'{r:g}' for r in sched.phase_ratio)}" if sched.name == "tri_stage"
                  else f"warmup {self.warmup_steps:,}")
        steps = f"steps: {self.max_steps:,}, {warmup}, EMA anneal {self.anneal_steps:,}"
        if rescale:
            steps += f" (x{self.reference_batch / b.global_batch:.4g} of the recipe's, same samples)"
        epochs = self.epochs
        if epochs is None:
            epochs_line = "epochs: unknown (no sample count for this data)"
        elif self.recipe.model.modality == "text":  # a document is cut into one or more blocks
            epochs_line = (f"epochs: at most {epochs:.2f} ({self.samples_per_epoch:,} documents, each one or more "
                           f"blocks of {self.recipe.data.text.block_size} tokens)")
        else:
            epochs_line = f"epochs: {epochs:.2f} of {self.samples_per_epoch:,} samples"
        out = [f"batch: {b}", micro, f"accumulation: {b.accumulation}", per_step, lr, steps,
               f"precision: {self.precision}" + (" (auto)" if self.recipe.train.precision == "auto" else ""),
               epochs_line, f"data: {self.data}"]
        return out + [f"note: {n}" for n in self.notes]

    def __str__(self) -> str:
        return str(self.batch)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (Linux /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(precision: str, device: str) -> str:
    """``auto``: bf16 where the device computes it natively, else fp32."""
    if precision != "auto":
        return precision
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        # Planning a GPU run from a machine without one: assume a bf16 GPU (A100 and later).
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def _scale_steps(steps: int, factor: float) -> int:
    return steps if factor == 1 else max(1 if steps else 0, round(steps * factor))


def _shard_set_size(recipe: Recipe) -> tuple[int, Optional[int]]:
    """Shard count, and the samples their indexes give (None when a shard has none); the shards are
    checked against their indexes as the loader checks them (ValueError naming the file)."""
    from scaling.data.shards import check_shard_set, expand_shards

    paths = expand_shards(recipe.data.train_shards)
    t = recipe.model.text
    counts = check_shard_set(paths, modality=recipe.model.modality, tokenizer=recipe.data.text.tokenizer or None,
                             vocab_size=t.vocab_size, pad_id=t.pad_id, mask_id=t.mask_id)
    return len(paths), None if any(n is None for n in counts) else sum(counts)


def describe_data(recipe: Recipe) -> tuple[str, Optional[int]]:
    """What ``data.train_shards`` reads, in words, and its samples per epoch when an index says so."""
    spec = recipe.data.train_shards.strip()
    if not spec:
        return "not set (data.train_shards)", None
    if spec == "synthetic":
        return "SYNTHETIC random samples (data.train_shards=synthetic): nothing real is learnt", None
    try:
        num_shards, num_samples = _shard_set_size(recipe)
    except ValueError as exn:
        return f"{spec} (not readable from here: {exn})", None
    return _shard_words(spec, num_shards, num_samples), num_samples


def _shard_words(spec: str, num_shards: int, num_samples: Optional[int]) -> str:
    if num_samples is None:
        return f"{num_shards} shards from {spec} (no index: sample count unknown)"
    return f"{num_shards} shards, {num_samples:,} samples from {spec}"


def resolve(recipe: Recipe, world_size: int, *, read_data: bool = True) -> Plan:
    """The plan of ``recipe`` on ``world_size`` ranks (ValueError when the batch cannot be split)."""
    t = recipe.train
    batch = BatchPlan.from_config(t, world_size, recipe.data.speech.sample_rate, warn=False)
    if batch.by_audio and batch.micro_batch_audio_samples < recipe.data.speech.max_samples:
        crop_s = recipe.data.speech.max_samples / recipe.data.speech.sample_rate
        if t.micro_batch_seconds < crop_s:
            raise ValueError(f"train.micro_batch_seconds ({t.micro_batch_seconds:g}) is less than one crop of "
                             f"data.speech.max_samples ({crop_s:g} s)")
        raise ValueError(f"train.global_batch_seconds ({t.global_batch_seconds:g}) gives each of {world_size} ranks "
                         f"{t.global_batch_seconds / world_size:.3g} s of audio per step, less than one crop of "
                         f"data.speech.max_samples ({crop_s:g} s): use at most "
                         f"{int(t.global_batch_seconds // crop_s)} ranks, or train.global_batch_seconds >= "
                         f"{world_size * crop_s:g}")
    reference = t.reference_batch or batch.global_batch
    factor = reference / batch.global_batch
    notes = []
    rule = recipe.optim.lr_scaling
    lr = recipe.optim.lr
    if factor != 1:
        if rule == "linear":
            lr = lr / factor
        elif rule == "sqrt":
            lr = lr / math.sqrt(factor)
        else:
            notes.append(f"the global batch ({batch.global_batch:g}) is not train.reference_batch ({reference:g}) "
                         "and optim.lr_scaling is none: the peak LR is kept")
    small_micro = batch.small_micro_batch(t.micro_batch_size)
    if small_micro:
        notes.append(small_micro)
    data, samples = describe_data(recipe) if read_data else (recipe.data.train_shards, None)
    return Plan(batch=batch, recipe=recipe, reference_batch=reference, lr=lr,
                max_steps=_scale_steps(t.max_steps, factor),
                warmup_steps=_scale_steps(recipe.schedule.warmup_steps, factor),
                anneal_steps=_scale_steps(recipe.ema.anneal_steps, factor),
                samples_per_epoch=samples, data=data, precision=pick_precision(t.precision, t.device),
                notes=tuple(notes))
