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
        info = init_process_group(engine_cfg.backend, self.device, engine_cfg.timeout_s)
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

    def count_gradient_traffic(self) -> "GradientTraffic":
        """Count the gradient all-reduces from here on (a diagnostic: benchmarks and tests). Call before
        the first step: DDP takes comm hooks only before its first forward."""
        traffic = GradientTraffic()
        self._model.register_comm_hook(None, traffic.hook)
        return traffic

    def micro_batch(self, *, last: bool):
        # DDP decides at forward time whether the coming backward all-reduces (it prepares its reducer
        # in forward), so the forward must be inside no_sync too: one all-reduce per optimizer step.
        return contextlib.nullcontext() if last else self._model.no_sync()


class GradientTraffic:
    """Calls and bytes of DDP's gradient all-reduces: a comm hook that counts each bucket and then runs
    DDP's own all-reduce (``default_hooks.allreduce_hook``, what DDP does without a hook)."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        self.calls += 1
        self.bytes += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(process_group, bucket)
