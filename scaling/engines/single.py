"""One process, one device: the reference every sharded engine is tested against."""

from __future__ import annotations

import torch

from scaling.config import EngineConfig, OptimConfig, ScheduleConfig, TrainConfig
from scaling.plan import BatchPlan
from scaling.engines.base import Engine, pick_device, prepare_blocks, tensor_bytes
from scaling.optim import build_optimizer, build_scheduler
from scaling.teacher import EMATeacher, ema_pairs


class SingleEngine(Engine):
    checkpoint_format = "full"

    @classmethod
    def check_world_size(cls, world_size: int) -> None:
        # Each rank would train its own copy into the same checkpoint folder and MLflow run.
        if world_size > 1:
            raise ValueError(f"engine.name=single trains one process, but the launcher started {world_size} ranks "
                             "(WORLD_SIZE): use --set engine.name=fsdp (or ddp, or deepspeed), or launch one process")

    def __init__(self, engine_cfg: EngineConfig, train_cfg: TrainConfig):
        super().__init__(engine_cfg, train_cfg)
        self.device = pick_device(train_cfg.device)

    def setup(self, student, teacher, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, max_steps: int,
              plan: BatchPlan):
        teacher = teacher if teacher is not None else EMATeacher(student.encoder)
        prepare_blocks(student, teacher, self.engine_cfg)
        self._grad_clip = float(optim_cfg.grad_clip)
        self._student = self._model = student.to(self.device)
        self._teacher = teacher.to(self.device)
        self.optimizer = build_optimizer(self._student, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, schedule_cfg, max_steps)
        # fp16 needs dynamic loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._pairs = ema_pairs(self._teacher.encoder, self._student.encoder)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def grad_norm(self) -> torch.Tensor:
        # fp16: unscale first, so the norm (and the skip decision, Engine.step) sees the true gradients;
        # an overflow shows as an inf norm.
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.get_total_norm([p.grad for p in self._grad_params()], foreach=True)

    def apply_step(self, norm: torch.Tensor) -> None:
        if self._grad_clip > 0:  # clip_grad_norm_'s two halves, the norm computed once
            torch.nn.utils.clip_grads_with_norm_(self._grad_params(), self._grad_clip, norm, foreach=True)
        # fp16 only: the scaler's inf check reads one value on the host (its skip-or-step decision).
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def skip_step(self) -> None:
        # fp16: the infs unscale_ recorded halve the loss scale (no optimizer step: GradScaler.step is not called).
        self.scaler.update()

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def _grad_params(self) -> list[torch.Tensor]:
        return [p for p in self._student.parameters() if p.grad is not None]

    def ema_tensors(self):
        return self._pairs

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"student.{k}": v for k, v in self._student.state_dict().items()}
        tensors.update({f"teacher.{k}": v for k, v in self._teacher.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def named_local_tensors(self):
        return [(f"student.{n}", p) for n, p in self._student.named_parameters()] + \
            [(f"teacher.{n}", p) for n, p in self._teacher.named_parameters()]

    def memory_report(self) -> dict[str, int]:
        trainable = [p for p in self._student.parameters() if p.requires_grad]
        return {
            "params": tensor_bytes(self._student.parameters()),
            "grads": tensor_bytes(trainable),  # fp32 gradients, one per trainable parameter
            "optimizer": tensor_bytes(t for s in self.optimizer.state.values() for t in s.values()
                                      if isinstance(t, torch.Tensor)),
            "teacher": tensor_bytes(self._teacher.parameters()),
        }

    def state_dict(self) -> dict:
        return {"model": self.full_state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        model = state["model"]
        # load_state_dict copies in place: the EMA's cached tensors stay valid.
        self._student.load_state_dict(_strip(model, "student."))
        self._teacher.load_state_dict(_strip(model, "teacher."))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
