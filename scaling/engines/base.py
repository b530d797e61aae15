"""The one interface between the training loop and a parallelism backend.

The trainer knows engines only through this class: it never branches on the
engine's name. An engine wraps (and, in the sharded engines, shards) the
student and the teacher the same way, owns the optimizer, the LR scheduler and
the loss scaler, and says which local tensors the EMA update pairs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from scaling.config import OptimConfig, ScheduleConfig, TrainConfig
from scaling.models import Data2Vec
from scaling.teacher import EMATeacher

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Engine(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device

    def __init__(self, train_cfg: TrainConfig):
        self.precision = train_cfg.precision
        self.autocast_dtype = _DTYPES.get(train_cfg.precision)

    # -- building
    @abstractmethod
    def setup(self, student: Data2Vec, teacher: EMATeacher, optim_cfg: OptimConfig,
              schedule_cfg: ScheduleConfig, max_steps: int) -> None:
        """Wrap/shard ``student`` and ``teacher`` alike; build optimizer, scheduler and scaler."""

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The student as it must be called for training (wrapped where the engine wraps it)."""

    @property
    @abstractmethod
    def teacher(self) -> EMATeacher: ...

    # -- one optimizer step
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, grad_clip: float) -> float:
        """Clip, step optimizer and scheduler, zero grads. Returns the (pre-clip) global grad norm."""

    @abstractmethod
    def ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) tensors the EMA pairs: this rank's local fp32 pieces, paired by name."""

    @property
    @abstractmethod
    def lr(self) -> float: ...

    # -- collectives the loop needs
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    # -- state
    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write student, teacher, optimizer, scheduler and scaler state into ``directory``."""

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    def close(self) -> None:
        pass
