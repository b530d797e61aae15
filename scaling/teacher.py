"""The EMA teacher (docs/data2vec.md §2).

The teacher owns only the EMA-updated parameters: a copy of the student's
``encoder``. The parts shared with the student (speech CNN, projection and
positional conv; text embeddings; docs/data2vec.md §2.2) exist once, in the student's
``frontend``, whose detached output the teacher consumes. The teacher is kept
in fp32, runs in eval mode under no_grad, and is updated after every optimizer
step with one fused ``torch._foreach_lerp_`` over the (local) tensors that an
engine pairs by name, so a sharded engine can pass its local shards and the
update needs no communication (docs/data2vec.md §2.4).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from scaling.config import EMAConfig


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """Decay used by the update that follows optimizer step ``step`` (0-based count of updates done).

    fairseq ``get_annealed_rate`` (docs/data2vec.md §2.1): linear from ``decay`` to ``end_decay`` over
    ``anneal_steps`` updates, then constant.
    """
    if cfg.decay == cfg.end_decay or cfg.anneal_steps <= 0 or step >= cfg.anneal_steps:
        return cfg.end_decay
    return cfg.end_decay - (cfg.end_decay - cfg.decay) * (1.0 - step / cfg.anneal_steps)


class EMATeacher(nn.Module):
    """An fp32 copy of the student's encoder, updated only by :meth:`update`."""

    def __init__(self, student_encoder: nn.Module, *, on_meta: bool = False):
        super().__init__()
        # Copy before any engine wraps or shards the student (deepcopy of an FSDP module fails).
        # on_meta: the parameters are fp32 meta tensors (shapes only, no memory, no copy of the values);
        # a sharding engine shards this teacher and then copies the student's local shards into it.
        memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"), requires_grad=False)
                for p in student_encoder.parameters()} if on_meta else {}
        self.encoder = copy.deepcopy(student_encoder, memo).float()
        self.encoder.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher never trains: no dropout, no layerdrop, no drop-path (docs/data2vec.md §2.3).
        return super().train(False)

    @torch.no_grad()
    def forward(self, teacher_x: torch.Tensor, *, padding_mask_BT, num_taps: int, tap: str):
        return self.encoder(teacher_x, padding_mask_BT=padding_mask_BT, num_taps=num_taps, tap=tap)

    @staticmethod
    @torch.no_grad()
    def update(teacher_tensors: list[torch.Tensor], student_tensors: list[torch.Tensor], decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, in one fused call; skipped once decay >= 1."""
        if decay >= 1.0:  # frozen teacher (docs/data2vec.md §2.1: fairseq `if self.ema.get_decay() < 1`)
            return
        torch._foreach_lerp_(teacher_tensors, student_tensors, 1.0 - decay)


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pair teacher and student parameters by name (never by position) and check that layouts match.

    Works on plain modules; a sharding engine maps both lists to local shards afterwards.
    """
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        s = student_params.get(name)
        assert s is not None, f"teacher parameter {name} has no student counterpart"
        assert t.shape == s.shape, f"{name}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
        assert t.dtype == torch.float32, f"{name}: the teacher must stay fp32, found {t.dtype}"
        t_list.append(t.data)
        s_list.append(s.data)
    assert len(t_list) == len(student_params), "the teacher must cover every student encoder parameter"
    return t_list, s_list

