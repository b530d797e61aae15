"""The training loop: micro-batches -> student and teacher -> loss -> optimizer step -> EMA.

Reads top to bottom; every backend difference lives behind ``Engine``.

What a user sees: every ``train.log_every`` steps (and at the last one) rank 0 logs one plain text
line to the ``scaling.trainer`` logger (step, loss, LR, grad norm, samples/s and tokens/s, MFU, data
wait, peak memory, ETA), and the same step's metrics go to MLflow. The tqdm bar is drawn only when
stderr is a terminal, so a batch job's log holds those lines and no bar fragments.

One host sync in a step, the engine's: before its optimizer step it reads two all-reduced flags
(whether to skip the step, whether a rank was signalled to stop; ``Engine.step``), as fairseq and
DeepSpeed read the gradient norm. Everything else, the masked count, the loss, the grad norm and
every logged statistic, stays on the device (:class:`StepRecord`); on log steps :meth:`Trainer.read`
reads the window of steps since the last one with one float64 all-reduce and one copy to the host.
The collapse guard and the bad-data stop act on log steps, from values that every rank reads alike,
so every rank stops at the same step.

Throughput is counted, not planned: each micro-batch contributes its rows, its real (non-padded)
encoder positions and its model FLOPs (:mod:`scaling.flops`), counted from the CPU batch and summed
over ranks in the log step's all-reduce, so batches of varying size (length-bucketed speech) are
counted as they are. The same collective carries each rank's peak memory and rank 0's RankMe
effective rank (:mod:`scaling.rankme`) of the teacher targets and of the student's predictions.

Faults (docs: the engine's ``step`` in scaling/engines/base.py):
- A step whose loss or gradient norm is not finite on any rank is skipped on every rank: no optimizer
  step, no LR-scheduler step (fairseq and DeepSpeed skip both on overflow), no EMA update; the step
  counter, the data position and the EMA decay schedule move on. Skips are logged (a warning each),
  counted (``train/skipped_steps`` in MLflow, ``skipped_steps`` in run.json and in the step stats), and
  ``train.max_skipped_steps`` consecutive ones stop the run with a checkpoint (of the last good
  weights, at the current data position) and :class:`DivergenceError`. Deciding before the optimizer
  step needs the step's one host read (Engine.step), also what carries the preemption flag.
- SIGTERM / SIGUSR1 (a preemption, or SLURM's warning before the time limit) only set a flag; the
  flag rides in that same MAX all-reduce, so every rank sees it at the same step boundary, saves
  that step's checkpoint and returns: ``scaling-pretrain`` exits 0 and a requeued job resumes there.
- LayerDrop draws from a generator seeded per step from ``(seed, step)``, like the masks (docs:
  :func:`layerdrop_seed`), so every rank drops the same blocks and a resumed run the same as an
  uninterrupted one. Dropout and drop-path draw from torch's RNG, per rank, saved in checkpoints.
"""

from __future__ import annotations

import datetime
import logging
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from scaling.checkpoint import Checkpointer, NonFiniteStateError
from scaling.config import EMAConfig, ModelConfig, MonitorConfig, ObjectiveConfig, TrainConfig
from scaling.data.device import to_device
from scaling.data.quality import BAD_KINDS, SHARD_EVENTS, STAT_NAMES
from scaling.engines import Engine
from scaling.flops import batch_counts, peak_flops
from scaling.masking import sample_rng
from scaling.objective import make_targets, regression_loss, std_from_stats, variance_stats
from scaling.plan import BatchPlan
from scaling.rankme import effective_rank
from scaling.teacher import EMATeacher, ema_decay
from scaling.tracking import Tracker

log = logging.getLogger("scaling.trainer")


class CollapseError(RuntimeError):
    """The collapse guard fired (docs/data2vec.md §1.3); a checkpoint was written first."""


class DivergenceError(RuntimeError):
    """``train.max_skipped_steps`` consecutive steps had a non-finite loss or gradient norm; a
    checkpoint of the last good state was written first."""


# A key of its own among the seed streams (masks: (seed, epoch, sample), ...): "LD".
_LAYERDROP_STREAM = 0x4C44


def layerdrop_seed(seed: int, step: int) -> int:
    """The LayerDrop seed of optimizer step ``step`` (0-based) of a run with ``seed``: a function of
    the two alone, the same on every rank (FSDP/ZeRO-3 need every rank to run the same blocks, DDP
    the same unused parameters) and in a resumed run, so no generator state needs saving."""
    return int(sample_rng(seed, _LAYERDROP_STREAM, step).integers(2**63))


class StopSignals:
    """SIGTERM and SIGUSR1 ask the run to stop at the next step boundary. The handler only records the
    signal (Python runs it between bytecodes of the main thread, so a collective in flight finishes);
    the loop hands the flag to ``Engine.step``, whose all-reduce (MAX) makes every rank stop at the same
    step. Installed for the training loop only (main thread; elsewhere signals keep their handlers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


@dataclass
class StepStats:
    """One optimizer step as read on the host. Every step has loss, masked count, grad norm and the
    throughput counts; the rest is measured on log steps only (NaN / empty elsewhere)."""
    loss: float
    num_masked: int
    grad_norm: float
    skipped: bool = False  # no optimizer, LR or EMA step (non-finite loss or gradient norm, fp16 overflow)
    # Counted over the global batch: rows, real (non-padded) encoder positions, model FLOPs (scaling.flops).
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    target_var: float = float("nan")
    pred_var: float = float("nan")
    local_var: float = float("nan")
    data: dict[str, float] = field(default_factory=dict)  # job-wide data counters (STAT_NAMES), cumulative
    # RankMe of rank 0's last micro-batch, largest peak memory of any rank.
    target_rank: float = float("nan")
    student_rank: float = float("nan")
    peak_memory_bytes: float = float("nan")


@dataclass
class StepRecord:
    """One optimizer step's values as :meth:`Trainer.train_step` leaves them: on the device, unread.

    Reading a device value is a host sync (the CPU waits for the GPU's queue to drain), so the step
    reads nothing; :meth:`Trainer.read` reads a window of records with one collective and one copy."""
    scalars: torch.Tensor  # float64 [3]: this rank's loss sum, the global masked count, the global grad norm
    counts: tuple[float, float, float]  # this rank's rows, real positions, FLOPs (from the CPU batches)
    # Log steps: [target | pred | local-encoder variance stats | RankMe (2) | peak memory per rank], to be summed.
    measured: torch.Tensor | None = None
    applied: bool = True  # the engine took the optimizer step (False: skipped, Engine.step)
    stop: bool = False  # some rank was signalled to stop: every rank saves and returns after this step
    loss_scale: float | None = None  # fp16 dynamic loss scale after the step


def host_stage(batch: dict, device: torch.device) -> dict:
    """What the step needs from a CPU batch, computed on the host before it moves: the flat indices of
    the masked positions (row-major, the order of boolean indexing). Gathering rows by these indices
    has a shape known in advance; boolean indexing on the device would make the host wait for a count.
    Pinned for a CUDA device, so that its copy is asynchronous like the batch's. (A batch made on the
    device, ``data.synthetic_on_device``, has its mask there: its count is read once per micro-batch.)"""
    if "mask_index_N" in batch:
        return batch
    index_N = batch["mask_BT"].reshape(-1).nonzero().squeeze(1)
    pin = device.type == "cuda" and index_N.device.type == "cpu"
    return {**batch, "mask_index_N": index_N.pin_memory() if pin else index_N}


def target_rows(targets_BTD: torch.Tensor, mask_index_N: torch.Tensor, views: int) -> torch.Tensor:
    """The targets at the masked positions: ``mask_index_N`` indexes the flat [R, T] mask of the R = B x
    ``views`` student rows (views of a sample consecutive); the teacher ran once per sample, so row r reads
    sample r // views. Index arithmetic on the device: no repeated [R, T, D] targets, no host sync."""
    if views > 1:
        T = targets_BTD.shape[1]
        mask_index_N = torch.div(mask_index_N, T * views, rounding_mode="floor") * T + mask_index_N % T
    return targets_BTD.flatten(0, 1).index_select(0, mask_index_N)


def cls_loss_sum(cls_pred_RD: torch.Tensor, targets_BTD: torch.Tensor, num_masked: int, obj: ObjectiveConfig,
                 weight: float) -> torch.Tensor:
    """data2vec 2.0 images: each view's CLS output regresses the mean of its sample's targets over the
    patches (fairseq ``cls_loss``). fairseq multiplies the summed CLS loss by the batch's masked count,
    so its weight grows with the per-GPU batch; here each view's CLS loss counts as ``weight`` x that
    view's masked positions (``num_masked / R``), which is the same for any batch split (docs/data2vec2.md)."""
    R = cls_pred_RD.shape[0]
    cls_target_RD = targets_BTD.mean(dim=1).repeat_interleave(R // targets_BTD.shape[0], dim=0)
    return regression_loss(cls_pred_RD, cls_target_RD, obj) * (weight * num_masked / R)


def _valid_rows(x_BTD: torch.Tensor | None, padding_mask_BT: torch.Tensor | None, like_ND: torch.Tensor):
    """Rows of the local encoder's output at real positions (an empty [0, D] when there is none)."""
    if x_BTD is None:
        return like_ND[:0].float()
    return (x_BTD[~padding_mask_BT] if padding_mask_BT is not None else x_BTD.flatten(0, 1)).float()


def data_metrics(data: dict[str, float], seen_bad: set[str]) -> dict[str, float]:
    """Samples read / good / items seen so far, and ``data/bad/<kind>`` for each kind that has been
    non-zero (``seen_bad`` remembers them: once a kind shows up its curve continues). A clean run
    has no ``data/bad`` chart at all instead of a dozen flat zeros."""
    out = {"data/samples_read": data["read"], "data/samples": data["good"], "data/items": data["items"]}
    for kind in BAD_KINDS + SHARD_EVENTS:
        if data[kind] or kind in seen_bad:
            seen_bad.add(kind)
            out[f"data/bad/{kind}"] = data[kind]
    return out


def peak_memory_bytes(device: torch.device) -> float:
    """This process's peak memory: CUDA's max allocated bytes on a GPU, else the peak resident set
    (``getrusage`` ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if math.isfinite(n) else "n/a"


class Trainer:
    def __init__(self, *, train_cfg: TrainConfig, objective_cfg: ObjectiveConfig, ema_cfg: EMAConfig,
                 monitor_cfg: MonitorConfig, plan: BatchPlan, engine: Engine, loader, tracker: Tracker,
                 checkpointer: Checkpointer, model_cfg: ModelConfig, seed: int = 0):
        self.train_cfg = train_cfg
        self.seed = seed  # the recipe's: LayerDrop's per-step seeds (layerdrop_seed)
        self.model_cfg = model_cfg  # FLOPs and positions per micro-batch (scaling.flops)
        self.objective_cfg = objective_cfg
        self.ema_cfg = ema_cfg
        self.monitor_cfg = monitor_cfg
        self.plan = plan
        self.engine = engine
        self.loader = loader
        self.tracker = tracker
        self.checkpointer = checkpointer
        self.step = 0  # optimizer steps done
        self.history: list[StepStats] = []
        self.memory: dict[str, float] = {}
        self._seen_bad: set[str] = set()  # data/bad kinds logged so far
        self._peak: tuple[float, str] | None = None  # (peak FLOP/s of one device, its name); None: no MFU
        self._start_step = 0
        self._wall = 0.0  # seconds of this run's loop so far
        self.skipped_steps: list[int] = []  # steps skipped in this run segment (1-based step numbers)
        self._consecutive_skips = 0
        self._last_applied = 0  # the last step whose update was applied (the state a divergence stop saves)
        self.preempted_at: int | None = None  # the step a stop signal ended this segment at
        self._layerdrop_modules: list | None = None
        self._loss_scale = float("nan")  # fp16: the dynamic loss scale after the last step

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict], *, measure: bool = False,
                   stop: Callable[[], bool] | None = None) -> StepRecord:
        """One optimizer step over this rank's CPU ``micro_batches``. The values it returns stay on the
        device until :meth:`read`; the one host read is the engine's skip/stop decision (Engine.step).
        ``measure`` (log steps, the same on every rank): also the variance statistics, RankMe and peak
        memory. ``stop()``: whether this rank was signalled to stop, asked just before the optimizer step (so
        a signal during this step's forward and backward stops after this step; Engine.step agrees it)."""
        engine, obj = self.engine, self.objective_cfg
        engine.model.train()
        self._seed_layerdrop(self.step)
        # Host side (CPU batches, before they move): rows, real positions, FLOPs; masked-row indices.
        counts = [batch_counts(self.model_cfg, b) for b in micro_batches]
        batches = [to_device(host_stage(b, engine.device), engine.device) for b in micro_batches]
        # The loss is normalised by the masked positions of the whole global batch: every micro-batch
        # and every rank (docs/data2vec.md §1.1 item 5), so results do not depend on how the batch is split.
        # The count stays on the device; a step without any masked position is reported by read().
        local_masked = sum(b["mask_index_N"].numel() for b in batches)
        # torch.full is a kernel with the value as its argument: no host-to-device copy to wait for.
        num_masked = engine.all_reduce_sum(torch.full((1,), float(local_masked), dtype=torch.float64,
                                                      device=engine.device))[0]
        # Engines average gradients over ranks; multiply back so the gradient is d(sum loss)/num_masked.
        loss_weight = (engine.world_size / num_masked.clamp_min(1.0)).float()

        loss_total = torch.zeros((), dtype=torch.float64, device=engine.device)
        stats = None  # measure: [target | pred | local-encoder] variance stats, summed over micro-batches
        for i, batch in enumerate(batches):
            with engine.micro_batch(last=i == len(batches) - 1):
                with engine.autocast():
                    out = engine.model(batch)
                    taps = engine.teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT,
                                          num_taps=obj.top_k, tap=obj.tap).taps
                targets_BTD = make_targets(taps, obj, out.padding_mask_BT)
                views = out.mask_BT.shape[0] // targets_BTD.shape[0]  # data2vec 2.0 multi-mask: M per sample
                target_ND = target_rows(targets_BTD, batch["mask_index_N"], views)
                loss_sum = regression_loss(out.pred_ND, target_ND, obj)
                if out.cls_pred_BD is not None and self.model_cfg.v2.cls_loss > 0:
                    loss_sum = loss_sum + cls_loss_sum(out.cls_pred_BD, targets_BTD, batch["mask_index_N"].numel(),
                                                       obj, self.model_cfg.v2.cls_loss)
                engine.backward(loss_sum * loss_weight)
            loss_total += loss_sum.detach()
            if measure:
                with torch.no_grad():
                    part = torch.cat([variance_stats(target_ND), variance_stats(out.pred_ND.detach().float()),
                                      variance_stats(_valid_rows(out.local_features_BTD, out.padding_mask_BT,
                                                                 target_ND))])
                stats = part if stats is None else stats + part
                last_rows = (target_ND.detach(), out.pred_ND.detach())

        result = engine.step(loss_total, stop=stop is not None and stop())
        grad_norm = result.grad_norm
        if result.applied:  # a skipped step leaves the student as it was: the teacher stays too
            teacher_tensors, student_tensors = engine.ema_tensors()
            EMATeacher.update(teacher_tensors, student_tensors, ema_decay(self.ema_cfg, self.step))

        measured = None
        if measure:
            # RankMe costs an SVD: log steps only, on rank 0's rows of the last micro-batch. The other ranks
            # add zeros, so the sum hands rank 0's values to everyone.
            ranks = torch.zeros(2, dtype=torch.float64)
            if engine.rank == 0:
                ranks[:] = torch.tensor([effective_rank(r) for r in last_rows])
            peaks = torch.zeros(engine.world_size, dtype=torch.float64)
            peaks[engine.rank] = peak_memory_bytes(engine.device)
            measured = torch.cat([stats.double(), ranks.to(engine.device), peaks.to(engine.device)])
        scalars = torch.stack([loss_total, num_masked, grad_norm.to(engine.device, torch.float64).reshape(())])
        total = tuple(float(sum(c[i] for c in counts)) for i in range(3))
        return StepRecord(scalars, total, measured, applied=result.applied, stop=result.stop,
                          loss_scale=result.loss_scale)

    def _seed_layerdrop(self, step: int) -> None:
        """Reseed every module that draws LayerDrop decisions (``set_layerdrop_seed``) for this step."""
        if self._layerdrop_modules is None:  # engine.model may wrap the student (DDP, DeepSpeed): search it
            self._layerdrop_modules = [m for m in self.engine.model.modules() if hasattr(m, "set_layerdrop_seed")]
        for m in self._layerdrop_modules:
            m.set_layerdrop_seed(layerdrop_seed(self.seed, step))

    def read(self, records: list[StepRecord], data_stats: torch.Tensor) -> list[StepStats]:
        """The host's view of a window of steps (the last one measured, except at a stop signal): one
        all-reduce of everything that sums over ranks, one copy to the host. Every rank gets the same
        values, so every rank's collapse guard and bad-data stop act on the same step. ``data_stats``:
        this rank's data counters (float64). Every rank calls."""
        engine = self.engine
        S = len(records)
        measured = records[-1].measured
        assert measured is not None or records[-1].stop, "the last step of a window is a measured (log) step"
        if measured is None:  # a stop between log steps: the window is read without the measured values
            measured = torch.zeros(0, dtype=torch.float64, device=engine.device)
        scalars = torch.stack([r.scalars for r in records])  # [S, 3]
        counts = torch.tensor([r.counts for r in records], dtype=torch.float64)  # [S, 3]
        summed = [scalars[:, 0], counts.flatten().to(engine.device), data_stats.to(engine.device), measured]
        # float64 keeps sample counts exact past 2**24.
        host = torch.cat([engine.all_reduce_sum(torch.cat(summed)), scalars[:, 1:].flatten()]).cpu()
        losses, counts, data, measured, rest = host.split([S, 3 * S, data_stats.numel(), measured.numel(), 2 * S])
        counts, rest = counts.view(S, 3).tolist(), rest.view(S, 2).tolist()
        out = []
        for i, (loss_sum, (samples, tokens, flops), (num_masked, grad_norm)) in enumerate(
                zip(losses.tolist(), counts, rest)):
            if num_masked == 0:
                raise RuntimeError(f"step {self.step - S + i + 1}: no masked position in the global batch; "
                                   "check the masking section")
            out.append(StepStats(loss=loss_sum / num_masked, num_masked=int(num_masked), grad_norm=grad_norm,
                                 skipped=not records[i].applied, samples=int(samples), tokens=int(tokens),
                                 flops=flops))
        last = out[-1]
        last.data = dict(zip(STAT_NAMES, data.tolist()))
        if measured.numel():
            n = (measured.numel() - 2 - engine.world_size) // 3  # one variance_stats vector: 1 + 2 * model dim
            target_stats, pred_stats, local_stats, ranks, peaks = measured.split([n, n, n, 2, engine.world_size])
            last.target_var = std_from_stats(target_stats)
            last.pred_var = std_from_stats(pred_stats)
            last.local_var = std_from_stats(local_stats)  # NaN where the modality has no local encoder
            last.target_rank, last.student_rank = ranks.tolist()
            last.peak_memory_bytes = float(peaks.max())
        return out

    # ------------------------------------------------------------------ the loop
    def run(self, *, start_step: int = 0, stop_at_step: int | None = None) -> list[StepStats]:
        self.step = self._start_step = self._last_applied = start_step
        last = min(self.train_cfg.max_steps, stop_at_step or self.train_cfg.max_steps)
        rank0 = self.engine.rank == 0
        # A bar only on a terminal: in a batch job's log it is fragments; the log lines say the same.
        bar = tqdm(total=last, initial=start_step, desc="pretrain", disable=not sys.stderr.isatty() or not rank0,
                   dynamic_ncols=True)
        self._peak = peak_flops(self.engine.device, self.engine.precision)
        if rank0:
            if self._peak is None:
                log.info("MFU not logged: no peak FLOP/s known for device %s (scaling/flops.py PEAK_TFLOPS)",
                         self.engine.device)
            self.tracker.set_tags({"device": self._peak[1] if self._peak else str(self.engine.device)})
        t_start = time.perf_counter()
        window = [0.0, 0.0]  # seconds and data-wait seconds since the last log step
        pending: list[StepRecord] = []  # steps since the last log step, unread
        with StopSignals() as signals:
            while self.step < last:
                t0 = time.perf_counter()
                micro_batches = [next(self.loader) for _ in range(self.plan.accumulation)]
                t_data = time.perf_counter() - t0
                log_step = (self.step + 1) % self.train_cfg.log_every == 0 or self.step + 1 == last
                record = self.train_step(micro_batches, measure=log_step, stop=lambda: signals.received is not None)
                pending.append(record)
                self.step += 1
                self._count_skip(record)
                if self.step == start_step + 1:  # optimizer state exists from the first step on
                    self._log_memory()
                read = log_step or record.stop  # the only host reads besides Engine.step's flags
                if read:
                    steps = self.read(pending, self.loader.stats())
                    pending = []
                    self.history.extend(steps)
                window = [window[0] + time.perf_counter() - t0, window[1] + t_data]
                self._wall = time.perf_counter() - t_start
                bar.update(1)
                if read:
                    stats = steps[-1]
                    bar.set_postfix(loss=f"{stats.loss:.4f}", tvar=f"{stats.target_var:.3f}")
                    # Every rank sees the same job-wide counts, so all stop at the same step (no hung collective).
                    self.loader.check_bad_fraction(stats.data)
                    # Throughput and data wait are means over the steps since the last log step.
                    self._log_step(stats, steps, *window, last)
                    window = [0.0, 0.0]
                    if log_step:
                        self._check_collapse(stats)
                self._check_skip_limit()
                if record.stop:
                    self._stop_for_signal(signals.received)
                    break
                if self.step % self.checkpointer.cfg.every_steps == 0 or self.step == last:
                    self.save()
                self._wall = time.perf_counter() - t_start
        bar.close()
        return self.history

    def _count_skip(self, record: StepRecord) -> None:
        """Book a step's skip (every rank alike: the flags are agreed) and warn about it."""
        if record.loss_scale is not None:
            self._loss_scale = record.loss_scale
        if record.applied:
            self._consecutive_skips = 0
            self._last_applied = self.step
            return
        self.skipped_steps.append(self.step)
        self._consecutive_skips += 1
        limit = self.train_cfg.max_skipped_steps
        scale = f"; fp16 loss scale now {record.loss_scale:g}" if record.loss_scale is not None else ""
        if self.engine.rank == 0:
            log.warning("step %d skipped: non-finite loss or gradient norm on some rank (no optimizer, LR or EMA "
                        "step; %d in a row, train.max_skipped_steps %d)%s", self.step, self._consecutive_skips,
                        limit, scale)
            if record.loss_scale is not None and record.loss_scale <= 1.0:
                log.warning("step %d: the fp16 loss scale is down to %g: the gradients overflow at any scale "
                            "(loss-scale underflow); use bf16, lower optim.lr or set optim.grad_clip",
                            self.step, record.loss_scale)

    def _check_skip_limit(self) -> None:
        """``train.max_skipped_steps`` consecutive skips stop the run with a checkpoint of the last good
        state (skipped steps change no weight, no optimizer state and no teacher)."""
        limit = self.train_cfg.max_skipped_steps
        if self._consecutive_skips < limit:
            return
        first = self.step - self._consecutive_skips + 1
        try:
            path = self.save()
            self.checkpointer.wait()
            saved = f"Checkpoint written to {path} (the weights of step {self._last_applied}, the last good one)."
        except NonFiniteStateError as exn:
            saved = str(exn)
        raise DivergenceError(
            f"step {self.step}: {self._consecutive_skips} consecutive steps ({first}-{self.step}) had a non-finite "
            f"loss or gradient norm and were skipped (train.max_skipped_steps={limit}). {saved} Lower optim.lr, "
            "set optim.grad_clip, use bf16 instead of fp16, or check the data of these steps.")

    def _stop_for_signal(self, signum: int | None) -> None:
        """A stop signal reached some rank: every rank saves this step and the loop ends."""
        path = self.save()
        self.checkpointer.wait()
        self.preempted_at = self.step
        if self.engine.rank == 0:
            what = signal.Signals(signum).name if signum is not None else "a signal on another rank"
            log.warning("stopped by %s after step %d: checkpoint %s written; rerun the same command "
                        "(checkpoint.resume=auto) to continue from it", what, self.step, path)
            self.tracker.set_tags({"preempted_at_step": str(self.step)})

    def _mfu(self, flops: float, seconds: float) -> float | None:
        if self._peak is None or seconds <= 0:
            return None
        return flops / seconds / (self._peak[0] * self.engine.world_size)

    def _log_step(self, stats: StepStats, steps: list[StepStats], dt: float, t_data: float, last: int) -> None:
        """One log step: the MLflow metrics and, on rank 0, one plain text line. ``steps``: every step since
        the previous log step (``stats`` is the last); ``dt`` and ``t_data``: their seconds and data wait."""
        samples, tokens, flops = (sum(getattr(s, k) for s in steps) for k in ("samples", "tokens", "flops"))
        lr = self.engine.lr
        samples_per_s, tokens_per_s = samples / dt, tokens / dt
        mfu = self._mfu(flops, dt)
        metrics = {
            # The first charts on the run's page: the un-prefixed names.
            "loss": stats.loss, "lr": lr, "target_var": stats.target_var, "pred_var": stats.pred_var,
            "throughput/samples_per_s": samples_per_s, "throughput/tokens_per_s": tokens_per_s,
            "throughput/tflops_per_s": flops / dt / 1e12,
            "train/grad_norm": stats.grad_norm, "train/ema_decay": ema_decay(self.ema_cfg, self.step - 1),
            "train/local_var": stats.local_var, "train/num_masked": stats.num_masked,
            "rank/target": stats.target_rank, "rank/student": stats.student_rank,
            "data/epoch": self.loader.epoch, "data/wait_s": t_data / len(steps), "data/wait_share": t_data / dt,
            "memory/peak_bytes": stats.peak_memory_bytes,
            # This run segment's skipped steps so far (each is also a warning line with its step).
            "train/skipped_steps": float(len(self.skipped_steps)),
            "train/loss_scale": self._loss_scale,
            **data_metrics(stats.data, self._seen_bad),
        }
        if mfu is not None:
            metrics["mfu"] = mfu
        self.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=self.step)
        if self.engine.rank != 0:
            return
        done = self.step - self._start_step
        eta = datetime.timedelta(seconds=round(self._wall / done * (last - self.step))) if done else "?"
        log.info("step %d/%d | loss %.4f | lr %.3g | grad norm %.3g | %.1f samples/s %.0f tokens/s%s | data wait %.0f%% | "
                 "peak mem %s | ETA %s", self.step, self.train_cfg.max_steps, stats.loss, lr, stats.grad_norm,
                 samples_per_s, tokens_per_s, f" MFU {mfu:.1%}" if mfu is not None else "", 100 * t_data / dt,
                 _gib(stats.peak_memory_bytes), eta)

    def summary(self) -> dict:
        """This run's segment: wall time, mean throughput, peak memory, final values (for run.json)."""
        h = self.history
        samples, tokens, flops = sum(s.samples for s in h), sum(s.tokens for s in h), sum(s.flops for s in h)
        wall = self._wall
        measured = [s for s in h if math.isfinite(s.target_rank)]
        peaks = [s.peak_memory_bytes for s in h if math.isfinite(s.peak_memory_bytes)]

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        final = {}
        if h:
            final = {"loss": finite(h[-1].loss), "target_var": finite(h[-1].target_var),
                     "pred_var": finite(h[-1].pred_var),
                     "target_rank": measured[-1].target_rank if measured else None,
                     "student_rank": finite(measured[-1].student_rank) if measured else None}
        return {"start_step": self._start_step, "step": self.step, "wall_time_s": wall, "samples": samples,
                "tokens": tokens, "samples_per_s": samples / wall if wall else None,
                "tokens_per_s": tokens / wall if wall else None, "mfu": self._mfu(flops, wall),
                "peak_memory_bytes": max(peaks) if peaks else None, "final": final,
                # Steps skipped for a non-finite loss or gradient norm (their numbers), and the step a
                # stop signal ended this segment at (None: it ran to its end).
                "skipped_steps": len(self.skipped_steps), "skipped": list(self.skipped_steps),
                "preempted_at": self.preempted_at}

    def save(self):
        return self.checkpointer.save(self.step, {
            "step": self.step, "data": self.loader.state_dict(), "mlflow_run_id": self.tracker.run_id,
        })

    def _log_memory(self) -> None:
        """Per-rank bytes of params, grads, optimizer state and teacher, gathered to rank 0's tracker."""
        report = self.engine.memory_report()
        kinds = sorted(report)
        table = torch.zeros(self.engine.world_size, len(kinds), dtype=torch.float64, device=self.engine.device)
        table[self.engine.rank] = torch.tensor([float(report[k]) for k in kinds], dtype=torch.float64)
        table = self.engine.all_reduce_sum(table).cpu()
        self.memory = {f"memory/rank{r}/{k}_bytes": float(table[r, j]) for r in range(table.shape[0])
                       for j, k in enumerate(kinds)}
        self.tracker.log_metrics(self.memory, step=self.step)

    def _check_collapse(self, stats: StepStats) -> None:
        m = self.monitor_cfg
        if self.step <= m.after_steps:
            return
        problems = []
        if not math.isfinite(stats.loss) and not stats.skipped:  # skipped steps: _count_skip's limit
            problems.append(f"loss is {stats.loss}")
        if stats.target_var < m.min_target_var:
            problems.append(f"target_var {stats.target_var:.4g} < monitor.min_target_var {m.min_target_var}")
        if stats.pred_var < m.min_pred_var:
            problems.append(f"pred_var {stats.pred_var:.4g} < monitor.min_pred_var {m.min_pred_var}")
        if m.min_target_rank > 0 and stats.target_rank < m.min_target_rank:  # NaN (no log step) never fires
            problems.append(f"target rank (RankMe) {stats.target_rank:.4g} < monitor.min_target_rank "
                            f"{m.min_target_rank}")
        if problems:
            try:
                path = self.save()
                self.checkpointer.wait()
                saved = f"Checkpoint written to {path}."
            except NonFiniteStateError as exn:  # a diverged state is never saved over good checkpoints
                saved = str(exn)
            raise CollapseError(f"step {self.step}: representation collapse: {'; '.join(problems)}. {saved}")
