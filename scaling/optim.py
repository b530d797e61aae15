"""AdamW with decoupled weight decay, and the learning-rate schedules of the published recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

from scaling.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; 1-D parameters (biases, norms, layer scale, mask embedding) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model)``, or over the given groups (an engine that needs its own split)."""
    # fairseq `adam` is decoupled (AdamW) decay (docs/data2vec.md §4); torch's AdamW is the same rule.
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    # Meta parameters (scaling.dry_run's build) have no fused kernel; the optimizer state is the same.
    fused = cfg.fused and not any(p.device.type == "meta" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused,
                             foreach=None if fused else True)


def lr_factor(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        # fairseq cosine: linear warmup from 0 to the peak, then cosine decay to min_lr_ratio.
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    # tri_stage (fairseq tri_stage_lr_scheduler): linear warmup from init_lr_scale, hold, then
    # exponential decay to final_lr_scale over the last phase.
    warmup, hold, decay = (int(r * max_steps) for r in cfg.phase_ratio)
    if step < warmup:
        return cfg.init_lr_scale + (1 - cfg.init_lr_scale) * step / warmup
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if decay > 0 and step <= decay:
        return math.exp(math.log(cfg.final_lr_scale) * step / decay)
    return cfg.final_lr_scale


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, max_steps))
