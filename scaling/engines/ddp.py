"""Data parallel: every rank holds the whole student, teacher and optimizer; gradients are all-reduced.

The teacher is replicated and updated locally on every rank from identical student weights, so
the EMA needs no communication. Checkpoints are the single-process files, written by rank 0.
"""

from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from scaling.config import EngineConfig, OptimConfig, ScheduleConfig, TrainConfig
from scaling.plan import BatchPlan
from scaling.distributed import init_process_group
from scaling.engines.base import ProcessGroup, pick_device
from scaling.engines.single import SingleEngine


class DDPEngine(ProcessGroup, SingleEngine):
    @classmethod
    def check_world_size(cls, world_size: int) -> None:
        pass  # any world size (SingleEngine's refusal of more than one rank is not inherited)

    def __init__(self, engine_cfg: EngineConfig, train_cfg: TrainConfig):
        super().__init__(engine_cfg, train_cfg)
        from scaling.distributed import env_info

        self.device = pick_device(train_cfg.device, env_info().local_rank)
        info = init_process_group(engine_cfg.backend, self.device)
        self.rank, self.world_size = info.rank, info.world_size

    def setup(self, student, teacher, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, max_steps: int,
              plan: BatchPlan):
        super().setup(student, teacher, optim_cfg, schedule_cfg, max_steps=max_steps, plan=plan)
        # LayerDrop skips whole blocks, whose parameters then get no gradient in that step.
        unused = getattr(student.encoder, "layerdrop", 0.0) > 0
        self._model = DistributedDataParallel(
            self._student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused,
        )

    def backward(self, loss, *, is_last_micro_batch: bool):
        sync = contextlib.nullcontext() if is_last_micro_batch else self._model.no_sync()
        with sync:
            self.scaler.scale(loss).backward()
