"""Turn a recipe's global batch into micro-batch x accumulation x world size for this cluster.

The recipe pins ``train.global_batch_size`` (the published recipes' batch, which the LR and EMA
values are tied to). ``train.micro_batch_size`` is the most one device should take at once; the
plan uses the largest micro-batch up to it that splits the per-rank share evenly, and makes up the
rest with gradient accumulation, so the same recipe runs on any number of ranks.
"""

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
        if cfg.global_batch_size % world_size:
            raise ValueError(f"train.global_batch_size ({cfg.global_batch_size}) must be a multiple of the "
                             f"world size ({world_size})")
        per_rank = cfg.global_batch_size // world_size
        micro = min(cfg.micro_batch_size, per_rank)
        while per_rank % micro:
            micro -= 1
        return cls(cfg.global_batch_size, micro, per_rank // micro, world_size)

    def __str__(self) -> str:
        return (f"global batch {self.global_batch_size} = micro {self.micro_batch_size} x "
                f"accumulation {self.accumulation} x world {self.world_size}")
