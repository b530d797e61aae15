"""The training loop: micro-batches -> student and teacher -> loss -> optimizer step -> EMA.

Reads top to bottom; every backend difference lives behind ``Engine``.

What a user sees: every ``train.log_every`` steps (and at the last one) rank 0 logs one plain text
line to the ``scaling.trainer`` logger (step, loss, LR, grad norm, samples/s and tokens/s, MFU, data
wait, peak memory, ETA), and the same step's metrics go to MLflow. The tqdm bar is drawn only when
stderr is a terminal, so a batch job's log holds those lines and no bar fragments.

Throughput is counted, not planned: each micro-batch contributes its rows, its real (non-padded)
encoder positions and its model FLOPs (:mod:`scaling.flops`), summed over ranks in the step's one
float64 all-reduce, so batches of varying size (length-bucketed speech) are counted as they are.
On log steps the same collective also carries each rank's peak memory and rank 0's RankMe
effective rank (:mod:`scaling.rankme`) of the teacher targets and of the student's predictions,
so every rank's collapse guard sees the same values and stops at the same step.
"""

from __future__ import annotations

import datetime
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from scaling.checkpoint import Checkpointer, NonFiniteStateError
from scaling.config import EMAConfig, ModelConfig, MonitorConfig, ObjectiveConfig, TrainConfig
from scaling.data.quality import BAD_KINDS, SHARD_EVENTS, STAT_NAMES
from scaling.engines import Engine
from scaling.flops import batch_counts, peak_flops
from scaling.objective import make_targets, regression_loss, std_from_stats, variance_stats
from scaling.plan import BatchPlan
from scaling.rankme import effective_rank
from scaling.teacher import EMATeacher, ema_decay
from scaling.tracking import Tracker

log = logging.getLogger("scaling.trainer")


class CollapseError(RuntimeError):
    """The collapse guard fired (docs/data2vec.md §1.3); a checkpoint was written first."""


@dataclass
class StepStats:
    loss: float
    num_masked: int
    target_var: float
    pred_var: float
    local_var: float
    grad_norm: float
    data: dict[str, float]  # job-wide data counters (scaling.data.quality.STAT_NAMES), cumulative
    # Counted over the global batch: rows, real (non-padded) encoder positions, model FLOPs (scaling.flops).
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    # Log steps only (NaN otherwise): RankMe of rank 0's last micro-batch, largest peak memory of any rank.
    target_rank: float = float("nan")
    student_rank: float = float("nan")
    peak_memory_bytes: float = float("nan")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
                 monitor_cfg: MonitorConfig, grad_clip: float, plan: BatchPlan, engine: Engine, loader,
                 tracker: Tracker, checkpointer: Checkpointer, model_cfg: ModelConfig):
        self.train_cfg = train_cfg
        self.model_cfg = model_cfg  # FLOPs and positions per micro-batch (scaling.flops)
        self.objective_cfg = objective_cfg
        self.ema_cfg = ema_cfg
        self.monitor_cfg = monitor_cfg
        self.grad_clip = grad_clip
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

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict], data_stats: torch.Tensor, *, measure: bool = False) -> StepStats:
        """``data_stats``: this rank's data counters (float64), summed over ranks in the step's stats all-reduce.
        ``measure`` (log steps, the same on every rank): also RankMe and peak memory."""
        engine, obj = self.engine, self.objective_cfg
        engine.model.train()
        # Rows, real positions and FLOPs from the CPU batches: no device sync.
        counts = [batch_counts(self.model_cfg, b) for b in micro_batches]
        local_counts = torch.tensor([float(sum(c[i] for c in counts)) for i in range(3)], dtype=torch.float64)
        # The loss is normalised by the masked positions of the whole global batch: every micro-batch
        # and every rank (docs/data2vec.md §1.1 item 5), so results do not depend on how the batch is split.
        local_masked = sum(int(b["mask_BT"].sum()) for b in micro_batches)
        num_masked = int(engine.all_reduce_sum(torch.tensor([float(local_masked)], device=engine.device)).item())
        if num_masked == 0:
            raise RuntimeError(f"step {self.step}: no masked position in the global batch; check the masking section")
        # Engines average gradients over ranks; multiply back so the gradient is d(sum loss)/num_masked.
        loss_weight = engine.world_size / num_masked

        sums = None  # [loss_sum | target stats | pred stats | local-encoder stats], summed over micro-batches
        for i, batch in enumerate(micro_batches):
            batch = _to_device(batch, engine.device)
            with engine.autocast():
                out = engine.model(batch)
                taps = engine.teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT,
                                      num_taps=obj.top_k, tap=obj.tap).taps
            target_ND = make_targets(taps, obj, out.padding_mask_BT)[out.mask_BT]
            loss_sum = regression_loss(out.pred_ND, target_ND, obj)
            engine.backward(loss_sum * loss_weight, is_last_micro_batch=i == len(micro_batches) - 1)
            with torch.no_grad():
                parts = [loss_sum.detach().float().view(1), variance_stats(target_ND),
                         variance_stats(out.pred_ND.detach().float()),
                         variance_stats(_valid_rows(out.local_features_BTD, out.padding_mask_BT, target_ND))]
                sizes = [p.numel() for p in parts]
                sums = torch.cat(parts) if sums is None else sums + torch.cat(parts)
                last_rows = (target_ND.detach(), out.pred_ND.detach())

        grad_norm = engine.step(self.grad_clip)
        teacher_tensors, student_tensors = engine.ema_tensors()
        EMATeacher.update(teacher_tensors, student_tensors, ema_decay(self.ema_cfg, self.step))

        # RankMe costs an SVD: log steps only, on rank 0's rows of the last micro-batch. The other ranks
        # add zeros, so the sum hands rank 0's values to everyone (NaN on other steps).
        ranks = torch.zeros(2, dtype=torch.float64)
        if engine.rank == 0:
            ranks[:] = torch.tensor([effective_rank(r) for r in last_rows]) if measure else float("nan")
        peaks = torch.zeros(engine.world_size if measure else 0, dtype=torch.float64)
        if measure:
            peaks[engine.rank] = peak_memory_bytes(engine.device)
        extra = [data_stats, local_counts, ranks, peaks]
        # One collective for every logged statistic; float64 keeps sample counts exact past 2**24.
        sums = engine.all_reduce_sum(torch.cat([sums.double()] + [t.to(engine.device) for t in extra]))
        loss_sum, target_stats, pred_stats, local_stats, data, totals, ranks, peaks = \
            sums.split(sizes + [t.numel() for t in extra])
        samples, tokens, flops = totals.tolist()
        return StepStats(
            loss=float(loss_sum) / num_masked,
            num_masked=num_masked,
            target_var=std_from_stats(target_stats),
            pred_var=std_from_stats(pred_stats),
            local_var=std_from_stats(local_stats),  # NaN where the modality has no local encoder
            grad_norm=grad_norm,
            data=dict(zip(STAT_NAMES, data.tolist())),
            samples=int(samples),
            tokens=int(tokens),
            flops=flops,
            target_rank=float(ranks[0]),
            student_rank=float(ranks[1]),
            peak_memory_bytes=float(peaks.max()) if measure else float("nan"),
        )

    # ------------------------------------------------------------------ the loop
    def run(self, *, start_step: int = 0, stop_at_step: int | None = None) -> list[StepStats]:
        self.step = self._start_step = start_step
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
        window = [0.0] * 6  # samples, tokens, FLOPs, seconds, data-wait seconds, steps since the last log
        while self.step < last:
            t0 = time.perf_counter()
            micro_batches = [next(self.loader) for _ in range(self.plan.accumulation)]
            t_data = time.perf_counter() - t0
            log_step = (self.step + 1) % self.train_cfg.log_every == 0 or self.step + 1 == last
            stats = self.train_step(micro_batches, self.loader.stats(), measure=log_step)
            # Every rank sees the same job-wide counts, so all stop at the same step (no hung collective).
            self.loader.check_bad_fraction(stats.data)
            self.step += 1
            if self.step == start_step + 1:  # optimizer state exists from the first step on
                self._log_memory()
            self.history.append(stats)
            dt = time.perf_counter() - t0
            self._wall = time.perf_counter() - t_start
            window = [w + x for w, x in zip(window, (stats.samples, stats.tokens, stats.flops, dt, t_data, 1))]
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tvar=f"{stats.target_var:.3f}")
            if log_step:  # throughput and data wait are means over the steps since the last log step
                self._log_step(stats, *window, last)
                window = [0.0] * 6
            self._check_collapse(stats)
            if self.step % self.checkpointer.cfg.every_steps == 0 or self.step == last:
                self.save()
            self._wall = time.perf_counter() - t_start
        bar.close()
        return self.history

    def _mfu(self, flops: float, seconds: float) -> float | None:
        if self._peak is None or seconds <= 0:
            return None
        return flops / seconds / (self._peak[0] * self.engine.world_size)

    def _log_step(self, stats: StepStats, samples: float, tokens: float, flops: float, dt: float, t_data: float,
                  steps: float, last: int) -> None:
        """One log step: the MLflow metrics and, on rank 0, one plain text line. ``samples`` .. ``t_data``:
        sums over the steps since the previous log step."""
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
            "data/epoch": self.loader.epoch, "data/wait_s": t_data / steps, "data/wait_share": t_data / dt,
            "memory/peak_bytes": stats.peak_memory_bytes,
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
                "peak_memory_bytes": max(peaks) if peaks else None, "final": final}

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
        if not math.isfinite(stats.loss):
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
