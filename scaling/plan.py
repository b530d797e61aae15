"""Turn a recipe's global batch into micro-batch x accumulation x world size for this cluster."""

from __future__ import annotations

from dataclasses import dataclass

from scaling.config import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int) -> "BatchPlan":
        per_step = cfg.micro_batch_size * world_size
        if cfg.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({cfg.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({cfg.micro_batch_size}) x world size ({world_size})"
            )
        return cls(cfg.global_batch_size, cfg.micro_batch_size, cfg.global_batch_size // per_step, world_size)

    def __str__(self) -> str:
        return (f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x "
                f"accumulation {self.accumulation} x world {self.world_size}")
