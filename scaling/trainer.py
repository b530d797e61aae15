"""The training loop: micro-batches -> student and teacher -> loss -> optimizer step -> EMA.

Reads top to bottom; every backend difference lives behind ``Engine``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from scaling.checkpoint import Checkpointer, NonFiniteStateError
from scaling.config import EMAConfig, MonitorConfig, ObjectiveConfig, TrainConfig
from scaling.data.quality import BAD_KINDS, SHARD_EVENTS, STAT_NAMES
from scaling.engines import Engine
from scaling.objective import make_targets, regression_loss, std_from_stats, variance_stats
from scaling.plan import BatchPlan
from scaling.teacher import EMATeacher, ema_decay
from scaling.tracking import Tracker


class CollapseError(RuntimeError):
    """The collapse guard fired (reference §1.3); a checkpoint was written first."""


@dataclass
class StepStats:
    loss: float
    num_masked: int
    target_var: float
    pred_var: float
    local_var: float
    grad_norm: float
    data: dict[str, float]  # job-wide data counters (scaling.data.quality.STAT_NAMES), cumulative


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _valid_rows(x_BTD: torch.Tensor | None, padding_mask_BT: torch.Tensor | None, like_ND: torch.Tensor):
    """Rows of the local encoder's output at real positions (an empty [0, D] when there is none)."""
    if x_BTD is None:
        return like_ND[:0].float()
    return (x_BTD[~padding_mask_BT] if padding_mask_BT is not None else x_BTD.flatten(0, 1)).float()


def _data_metrics(data: dict[str, float]) -> dict[str, float]:
    """Samples read / good / items seen so far, and bad samples by kind (zeros included, so a
    clean run shows flat zero curves rather than no curve)."""
    out = {"data/samples_read": data["read"], "data/samples": data["good"], "data/items": data["items"]}
    out.update({f"data/bad/{k}": data[k] for k in BAD_KINDS + SHARD_EVENTS})
    return out


class Trainer:
    def __init__(self, *, train_cfg: TrainConfig, objective_cfg: ObjectiveConfig, ema_cfg: EMAConfig,
                 monitor_cfg: MonitorConfig, grad_clip: float, plan: BatchPlan, engine: Engine, loader,
                 tracker: Tracker, checkpointer: Checkpointer):
        self.train_cfg = train_cfg
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

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict], data_stats: torch.Tensor) -> StepStats:
        """``data_stats``: this rank's data counters (float64), summed over ranks in the step's stats all-reduce."""
        engine, obj = self.engine, self.objective_cfg
        engine.model.train()
        # The loss is normalised by the masked positions of the whole global batch: every micro-batch
        # and every rank (reference §1.1 item 5), so results do not depend on how the batch is split.
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

        grad_norm = engine.step(self.grad_clip)
        teacher_tensors, student_tensors = engine.ema_tensors()
        EMATeacher.update(teacher_tensors, student_tensors, ema_decay(self.ema_cfg, self.step))

        # One collective for every logged statistic; float64 keeps sample counts exact past 2**24.
        sums = engine.all_reduce_sum(torch.cat([sums.double(), data_stats.to(engine.device)]))
        loss_sum, target_stats, pred_stats, local_stats, data = sums.split(sizes + [data_stats.numel()])
        return StepStats(
            loss=float(loss_sum) / num_masked,
            num_masked=num_masked,
            target_var=std_from_stats(target_stats),
            pred_var=std_from_stats(pred_stats),
            local_var=std_from_stats(local_stats),  # NaN where the modality has no local encoder
            grad_norm=grad_norm,
            data=dict(zip(STAT_NAMES, data.tolist())),
        )

    # ------------------------------------------------------------------ the loop
    def run(self, *, start_step: int = 0, stop_at_step: int | None = None) -> list[StepStats]:
        self.step = start_step
        last = min(self.train_cfg.max_steps, stop_at_step or self.train_cfg.max_steps)
        bar = tqdm(total=last, initial=start_step, desc="pretrain", disable=self.engine.rank != 0,
                   dynamic_ncols=True)
        samples_per_step = self.plan.global_batch_size
        while self.step < last:
            t0 = time.perf_counter()
            micro_batches = [next(self.loader) for _ in range(self.plan.accumulation)]
            t_data = time.perf_counter() - t0
            stats = self.train_step(micro_batches, self.loader.stats())
            # Every rank sees the same job-wide counts, so all stop at the same step (no hung collective).
            self.loader.check_bad_fraction(stats.data)
            self.step += 1
            if self.step == start_step + 1:  # optimizer state exists from the first step on
                self._log_memory()
            self.history.append(stats)
            dt = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tvar=f"{stats.target_var:.3f}")
            if self.step % self.train_cfg.log_every == 0 or self.step == last:
                self.tracker.log_metrics({
                    "loss": stats.loss, "lr": self.engine.lr, "ema_decay": ema_decay(self.ema_cfg, self.step - 1),
                    "target_var": stats.target_var, "pred_var": stats.pred_var, "local_var": stats.local_var,
                    "grad_norm": stats.grad_norm, "samples_per_s": samples_per_step / dt,
                    "data_wait_s": t_data, "data_wait_share": t_data / dt, "num_masked": stats.num_masked,
                    "epoch": self.loader.epoch, **_data_metrics(stats.data),
                }, step=self.step)
            self._check_collapse(stats)
            if self.step % self.checkpointer.cfg.every_steps == 0 or self.step == last:
                self.save()
        bar.close()
        return self.history

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
        if problems:
            try:
                path = self.save()
                self.checkpointer.wait()
                saved = f"Checkpoint written to {path}."
            except NonFiniteStateError as exn:  # a diverged state is never saved over good checkpoints
                saved = str(exn)
            raise CollapseError(f"step {self.step}: representation collapse: {'; '.join(problems)}. {saved}")
