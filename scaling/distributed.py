"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM via torchrun).

torchrun and the deepspeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; the deepspeed launcher also passes ``--local_rank``. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def env_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def pick_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(backend: str, device: torch.device) -> DistInfo:
    """Join the job's process group (idempotent); a world of one needs no launcher."""
    info = env_info()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(pick_backend(backend, device), rank=info.rank, world_size=info.world_size)
    return DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank)
