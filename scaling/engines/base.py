"""The one interface between the training loop and a parallelism backend.

The trainer knows engines only through this class: it never branches on the
engine's name. An engine wraps (and, in the sharded engines, shards) the
student and the teacher the same way, owns the optimizer, the LR scheduler and
the loss scaler, and says which local tensors the EMA update pairs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from scaling.config import EngineConfig, OptimConfig, ScheduleConfig, TrainConfig
from scaling.models import Data2Vec
from scaling.plan import BatchPlan
from scaling.teacher import EMATeacher

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def prepare_blocks(student: Data2Vec, teacher: EMATeacher, engine_cfg: EngineConfig,
                   shard: Callable[[nn.Module, bool], None] | None = None) -> None:
    """Every encoder block of student and teacher alike, in one fixed order: activation checkpointing,
    then ``torch.compile`` of the block, then ``shard(block, is_teacher)`` (an engine's sharding of one
    unit). torchtitan's order (torchtitan/models/llama3/infra/parallelize.py): the checkpoint wrapper
    must sit inside the compiled region so compile sees the recomputation; sharding comes last
    (``Module.compile`` compiles the block's ``forward`` frame, so FSDP2's module hooks run outside the
    graph either way, and the shape-marking hook below must run after FSDP2's).

    Both encoders get the same wrappers, so parameter names (and the EMA's pairing by name) stay equal.
    The teacher's forward runs under no_grad, where the checkpoint wrapper only runs the block.
    ``Module.compile`` compiles in place: names and state dicts do not change. The parts with
    data-dependent shapes (gathering masked rows, building targets) run outside the blocks.

    Shapes: ``dynamic=None``, dynamo's default, static until a dimension is seen to change. Where the
    encoder says its blocks' shapes vary (``block_shapes_vary``: speech, text), a forward pre-hook
    marks dims 0 and 1 (batch, length) of every tensor input dynamic before each call, so the first
    trace is already the one graph (per mode: training, teacher no_grad) that serves every batch;
    unmarked, dynamo traces a static graph, drops it at the second length and traces again.
    ``dynamic=True`` would make D symbolic as well, and a length equal to D (or to ffn_dim) would
    then be unified with it and specialised. The hook is a frame of its own that dynamo must not
    trace (``torch.compiler.disable``, as FSDP2's hooks): it runs eagerly, before the compiled
    ``forward`` frame. It is registered after the sharding, so it runs after FSDP2's pre-forward
    hook, which replaces the student's inputs by autograd aliases (for its post-backward hook) that
    would not carry marks set earlier.
    Parameters that differ from block to block must not be Python numbers read in ``forward``
    (a graph constant: one graph per block; see ``DropPath``).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    mark_dynamic = torch.compiler.disable(_mark_batch_and_length_dynamic) if engine_cfg.compile else None
    for encoder, is_teacher in ((student.encoder, False), (teacher.encoder, True)):
        for i in range(len(encoder.blocks)):
            if engine_cfg.activation_checkpointing:
                encoder.blocks[i] = checkpoint_wrapper(encoder.blocks[i])
            if engine_cfg.compile:
                encoder.blocks[i].compile(fullgraph=engine_cfg.compile_fullgraph, dynamic=None)
            if shard is not None:
                shard(encoder.blocks[i], is_teacher)
            if engine_cfg.compile and encoder.block_shapes_vary:
                encoder.blocks[i].register_forward_pre_hook(mark_dynamic, with_kwargs=True)


def _mark_batch_and_length_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a compiled block whose [B, T] vary (see :func:`prepare_blocks`)."""
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 1)


@dataclass
class StepResult:
    """One optimizer step as every rank took it (the flags are agreed by all ranks, so every rank
    branches alike). ``grad_norm``: the global pre-clip norm, a 0-d tensor left on the device.
    ``applied``: False when the step was skipped, i.e. no optimizer step and no LR-scheduler step
    (a non-finite loss or gradient norm on any rank, or an fp16 loss-scale overflow); the trainer
    then skips the EMA update too. ``stop``: some rank was asked to stop (a preemption signal).
    ``loss_scale``: fp16's dynamic loss scale after the step (None without loss scaling)."""
    grad_norm: torch.Tensor
    applied: bool = True
    stop: bool = False
    loss_scale: float | None = None


class Engine(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device
    # Which writer/reader of scaling.checkpoint.formats persists state_dict(): "full", "dcp" or "deepspeed".
    checkpoint_format: str

    @classmethod
    def check_world_size(cls, world_size: int) -> None:
        """ValueError when this engine cannot run on a job of ``world_size`` ranks (checked before building)."""

    def __init__(self, engine_cfg: EngineConfig, train_cfg: TrainConfig):
        self.engine_cfg = engine_cfg
        self.precision = train_cfg.precision
        self.autocast_dtype = _DTYPES.get(train_cfg.precision)

    # -- building
    @abstractmethod
    def setup(self, student: Data2Vec, teacher: EMATeacher | None, optim_cfg: OptimConfig,
              schedule_cfg: ScheduleConfig, *, max_steps: int, plan: BatchPlan) -> None:
        """Wrap/shard ``student`` and ``teacher`` alike; build optimizer, scheduler and scaler.
        ``teacher=None``: the teacher starts as a copy of the student's encoder, made by the engine
        (fsdp: from the student's local shards after sharding, so no rank ever holds a whole one)."""

    _model: nn.Module  # set by setup()
    _teacher: EMATeacher

    @property
    def model(self) -> nn.Module:
        """The student as it must be called for training (wrapped where the engine wraps it)."""
        return self._model

    @property
    def teacher(self) -> EMATeacher:
        return self._teacher

    # -- one optimizer step
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def micro_batch(self, *, last: bool):
        """Context around the forward AND backward of one micro-batch: gradients are synchronised across
        ranks only in the last one of an optimizer step (DDP must see its forward inside ``no_sync``
        as well, or every backward all-reduces). One process: nothing to defer."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (inside :meth:`micro_batch`)."""

    def step(self, loss: torch.Tensor, *, stop: bool = False) -> StepResult:
        """Take or skip the optimizer step, then zero the gradients. ``loss``: this rank's loss of the
        step (any finite value means finite); ``stop``: this rank wants to stop after this step.

        Skip rule (fairseq's and DeepSpeed's on overflow): when the loss or the global gradient norm is
        not finite on any rank, no optimizer step and no LR-scheduler step happen, so the weights, the
        optimizer state and the LR schedule are exactly those of the last good step. The decision and
        ``stop`` travel in one MAX all-reduce of two flags, read once on the host: the one host sync of
        a step, which an engine must make before its optimizer step to skip it."""
        norm = self.grad_norm()
        bad = ~(torch.isfinite(loss.detach().double().sum()) & torch.isfinite(norm.detach().double()))
        flags = torch.stack([bad.double(), torch.full((), float(stop), dtype=torch.float64, device=bad.device)])
        bad, stop = (bool(x) for x in self.all_reduce_max(flags.to(self.device)).tolist())
        if bad:
            self.skip_step()
        else:
            self.apply_step(norm)
        self.zero_grad()
        return StepResult(norm, applied=not bad, stop=stop, loss_scale=self.loss_scale())

    # The pieces of :meth:`step` (an engine that steps in one call of its library overrides step instead).
    def grad_norm(self) -> torch.Tensor:
        """The global pre-clip gradient norm (unscaled), a 0-d tensor on the device."""
        raise NotImplementedError

    def apply_step(self, norm: torch.Tensor) -> None:
        """Clip at ``optim.grad_clip`` with ``norm``, step the optimizer and the LR scheduler."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """What a skipped step still does (fp16: lower the loss scale). Nothing by default."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss_scale(self) -> float | None:
        return None

    @abstractmethod
    def ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) tensors the EMA pairs: this rank's local fp32 pieces, paired by name."""

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- collectives the loop needs
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    # -- state (scaling.checkpoint decides the files; the engine only hands its state over)
    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resume needs, in this engine's own layout (full tensors, DCP-ready sharded
        state dicts, or DeepSpeed's engine plus the teacher partitions). Every rank calls."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what the checkpoint format read back into the shape of :meth:`state_dict`."""

    @abstractmethod
    def named_local_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """This rank's own pieces of the student (fp32 masters where they differ) and of the teacher,
        named ``student.*`` / ``teacher.*``: what a save checks for non-finite values."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) ``student.*`` (``Data2Vec.state_dict()``) and ``teacher.*``
        (``EMATeacher.state_dict()``) tensors on rank 0; may be empty elsewhere. Every rank calls."""

    @abstractmethod
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: ``params``, ``grads`` (during backward), ``optimizer``, ``teacher``."""

    def close(self) -> None:
        pass


class ProcessGroup:
    """The collectives of an engine that runs on a torch.distributed process group (mixed in first)."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
