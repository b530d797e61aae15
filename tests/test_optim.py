import math

import pytest
import torch

from scaling.config import ScheduleConfig
from scaling.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from scaling.config import OptimConfig


def test_tri_stage_matches_fairseq_phases():
    cfg = ScheduleConfig(name="tri_stage", phase_ratio=[0.1, 0.6, 0.3], init_lr_scale=0.01, final_lr_scale=0.05)
    max_steps = 100  # warmup 10, hold 60, decay 30
    assert lr_factor(cfg, 0, max_steps) == pytest.approx(0.01)
    assert lr_factor(cfg, 5, max_steps) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(cfg, 10, max_steps) == 1.0 and lr_factor(cfg, 69, max_steps) == 1.0
    assert lr_factor(cfg, 85, max_steps) == pytest.approx(0.05 ** (15 / 30))  # exponential decay
    assert lr_factor(cfg, 100, max_steps) == pytest.approx(0.05)


def test_cosine_warmup_then_decay_to_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg, 110, 110) == pytest.approx(0.1)


def test_no_weight_decay_on_1d_params_and_scheduler_drives_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.ndim for p in decay["params"]] == [2] and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(lr=1.0))
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=4), 10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])
