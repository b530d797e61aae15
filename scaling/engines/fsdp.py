"""FSDP2 (``fully_shard``): student and fp32 EMA teacher sharded alike, EMA on local shards.

Layout (torchtitan's order, torchtitan/models/llama3/infra/parallelize.py): activation checkpointing, then ``fully_shard``
on every encoder block, then on the root, for the student and for the teacher with the same mesh,
the same units and the same ``MixedPrecisionPolicy``. Every parameter is then a DTensor sharded on
dim 0, and a teacher parameter's local shard covers exactly the same elements as the student
parameter of the same name, so the EMA (docs/data2vec.md §2.4) is one ``_foreach_lerp_`` over the local
fp32 shards with no communication.

- bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. The sharded parameters
  (optimizer masters and the teacher) stay fp32; each forward all-gathers a bf16 cast. No autocast.
- The teacher root is wrapped with ``reshard_after_forward=True`` explicitly: it never runs
  backward, so with False (or FSDP's default for a root) its parameters would stay unsharded after
  the first forward and every later forward would silently reuse the step-0 weights.
- ``engine.replicas > 1``: hybrid sharding on a 2-D mesh (replicate, shard).
- State: DCP-ready sharded state dicts of student, teacher and optimizer, plus the replicated
  LR-scheduler state (written by scaling.checkpoint's ``dcp`` format; each rank writes its shards).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from scaling.config import EngineConfig, OptimConfig, ScheduleConfig, TrainConfig
from scaling.distributed import env_info, init_process_group
from scaling.engines.base import Engine, ProcessGroup, pick_device, prepare_blocks
from scaling.optim import build_optimizer, build_scheduler
from scaling.plan import BatchPlan
from scaling.teacher import EMATeacher


def _quiet_known_warnings() -> None:
    """The one warning FSDP2 prints on every run of this project's models, filtered by exact message,
    category and module (listed with its cause in docs/performance.md "Warnings")."""
    # FSDP2 warns when a sharded module's output is a view: an in-place op on it would skip the hook
    # FSDP registers there for backward. Each encoder block returns (x, tap), and the "ffn" tap is
    # fc2's output, which nn.Linear on a [B, T, D] input returns as a view of its 2-D matmul; x is not
    # a view. The student calls its encoder with num_taps=0 and drops every tap unread (FSDP's hook
    # on it is never needed), the teacher reads its taps under no_grad, where FSDP registers no hook;
    # nothing modifies a tap in place. Returning a copy instead would cost a [B, T, D] copy per block.
    # tests/test_dist_faults.py checks these premises (x is no view, the student's taps are dropped).
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \((FSDPPreLNBlock|FSDPPostLNBlock|FSDPCheckpointWrapper)\) "
        r"returned a view tensor\.", category=UserWarning,
        module=r"torch\.distributed\.fsdp\._fully_shard\._fsdp_state$")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _local_bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


class FSDPEngine(ProcessGroup, Engine):
    checkpoint_format = "dcp"

    def __init__(self, engine_cfg: EngineConfig, train_cfg: TrainConfig):
        super().__init__(engine_cfg, train_cfg)
        if train_cfg.precision == "fp16":  # also rejected by recipe validation
            raise ValueError("train.precision: fp16 needs dynamic loss scaling: use bf16 with fsdp")
        info = env_info()
        replicas = engine_cfg.replicas
        if replicas < 1 or info.world_size % replicas:
            raise ValueError(f"engine.replicas ({replicas}) must divide the world size ({info.world_size})")
        self.device = pick_device(train_cfg.device, info.local_rank)
        info = init_process_group(engine_cfg.backend, self.device, engine_cfg.timeout_s)
        _quiet_known_warnings()
        self.rank, self.world_size = info.rank, info.world_size
        if replicas > 1:
            self.mesh = init_device_mesh(self.device.type, (replicas, self.world_size // replicas),
                                         mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        # The policy casts parameters and inputs; autocast on top would only add casts.
        self.autocast_dtype = None
        if train_cfg.precision == "bf16":
            self.mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            self.mp_policy = MixedPrecisionPolicy()

    # ------------------------------------------------------------------ building
    def setup(self, student, teacher, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, max_steps: int,
              plan: BatchPlan):
        # No teacher given: a meta copy of the encoder, sharded like the student, then filled from the
        # student's local shards below; the whole teacher never exists anywhere.
        from_student = teacher is None
        if from_student:
            teacher = EMATeacher(student.encoder, on_meta=True)
        # No .to(device) first: fully_shard moves each unit's parameters to the mesh's device as it shards
        # them, so the whole student never sits on one device.
        raf = self.engine_cfg.reshard_after_forward

        def shard(block, is_teacher: bool):
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=is_teacher or raf)

        prepare_blocks(student, teacher, self.engine_cfg, shard)  # checkpointing, compile, then sharding
        fully_shard(student, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=raf)
        fully_shard(teacher, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=True)
        if from_student:
            teacher.to_empty(device=self.device)  # allocates this rank's shards only
        self._student = self._model = student
        self._teacher = teacher
        self._grad_clip = float(optim_cfg.grad_clip)
        self.optimizer = build_optimizer(student, optim_cfg)  # DTensor params: the optimizer state is sharded
        self.scheduler = build_scheduler(self.optimizer, schedule_cfg, max_steps)
        self._pairs = self._ema_pairs()
        self._locals: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        if from_student:  # identical sharding: a local copy, no communication
            with torch.no_grad():
                torch._foreach_copy_([t._local_tensor for t, _ in self._pairs], [s._local_tensor for _, s in self._pairs])
        self._copy_buffers()

    def _ema_pairs(self) -> list[tuple[DTensor, DTensor]]:
        """(teacher, student) encoder parameters paired by name, with identical sharding."""
        student_params = dict(self._student.encoder.named_parameters())
        pairs = []
        for name, t in self._teacher.encoder.named_parameters():
            s = student_params.get(name)
            assert s is not None, f"teacher parameter {name} has no student counterpart"
            # Not a DTensor means a module was left unsharded; different placements or local shapes
            # mean different sharding: either way the local EMA would pair the wrong elements.
            assert isinstance(t, DTensor) and isinstance(s, DTensor), f"{name}: {type(t).__name__}, {type(s).__name__}"
            assert t.device_mesh == s.device_mesh and t.placements == s.placements, \
                f"{name}: teacher {t.placements} vs student {s.placements}"
            assert t.shape == s.shape and t._local_tensor.shape == s._local_tensor.shape, \
                f"{name}: teacher local {tuple(t._local_tensor.shape)} vs student {tuple(s._local_tensor.shape)}"
            assert t._local_tensor.dtype == torch.float32, f"{name}: the teacher must stay fp32"
            pairs.append((t, s))
        assert len(pairs) == len(student_params), "the teacher must cover every student encoder parameter"
        return pairs

    def _copy_buffers(self) -> None:
        """Buffers are not sharded (FSDP2 leaves them replicated): a local copy, as fairseq does."""
        student_buffers = dict(self._student.encoder.named_buffers())
        with torch.no_grad():
            for name, b in self._teacher.encoder.named_buffers():
                b.copy_(student_buffers[name])

    # ------------------------------------------------------------------ interface
    def micro_batch(self, *, last: bool):
        # Earlier micro-batches keep unsharded gradients (more memory) and reduce-scatter once, in the
        # last backward of the step.
        self._student.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self._grad_params()], foreach=True)
        if isinstance(norm, DTensor):  # partial norms of the shards: reduce once
            norm = norm.full_tensor()
        return norm

    def apply_step(self, norm: torch.Tensor) -> None:
        if self._grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._grad_params(), self._grad_clip, norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()

    def _grad_params(self) -> list[torch.Tensor]:
        return [p for p in self._student.parameters() if p.grad is not None]

    def ema_tensors(self):
        # Taken after FSDP's lazy init (first forward), which may re-point the local tensor of an
        # empty shard; the non-empty ones keep their storage for the whole run (load is in place).
        if self._locals is None:
            self._locals = ([t._local_tensor for t, _ in self._pairs], [s._local_tensor for _, s in self._pairs])
        return self._locals

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        self._complete_optimizer_state()
        # Never ignore_frozen_params=True: it drops the (requires_grad=False) teacher.
        return {"student": get_model_state_dict(self._student), "teacher": get_model_state_dict(self._teacher),
                "optim": get_optimizer_state_dict(self._student, self.optimizer),
                "scheduler": self.scheduler.state_dict()}

    def _complete_optimizer_state(self) -> None:
        """AdamW holds no state for a parameter that has had no gradient yet (a block that LayerDrop
        dropped in every step so far), so DCP would save no entry for it, and the resume, whose fresh
        optimizer DCP initialises for every parameter, fails on the missing keys. Such parameters get
        the state AdamW starts them with (step 0, zero moments), made by AdamW itself: one step at
        LR 0 over zero gradients of those parameters only, then their step count back to 0. Their
        values do not change (AdamW at LR 0 adds exact zeros and decays by a factor of exactly 1), nor
        does any later update. A fresh optimizer (no state at all) is left to DCP's own initialisation."""
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        missing = [p for p in params if p not in opt.state]
        if not missing or not opt.state:
            return
        assert all(p.grad is None for p in params), "the state is taken between steps, after zero_grad"
        lrs = [g["lr"] for g in opt.param_groups]
        for p in missing:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = 0.0
        opt.step()
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in missing:
            p.grad = None
            step = opt.state[p]["step"]
            if isinstance(step, torch.Tensor):
                step.zero_()
            else:
                opt.state[p]["step"] = 0

    def load_state_dict(self, state: dict) -> None:
        def storages():
            return [t.untyped_storage().data_ptr() for pair in self._pairs
                    for t in (pair[0]._local_tensor, pair[1]._local_tensor) if t.numel()]

        before = storages()
        set_model_state_dict(self._student, state["student"])
        set_model_state_dict(self._teacher, state["teacher"])
        set_optimizer_state_dict(self._student, self.optimizer, state["optim"])
        assert storages() == before, "loading must restore the shards in place (the EMA caches their local tensors)"
        self._locals = None
        self.scheduler.load_state_dict(state["scheduler"])

    def named_local_tensors(self):
        return [(f"student.{n}", _local(p)) for n, p in self._student.named_parameters()] + \
            [(f"teacher.{n}", _local(p)) for n, p in self._teacher.named_parameters()]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered fp32 tensors on rank 0 (every rank must call), named as the single engine names them."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        student = get_model_state_dict(self._student, options=opts)
        teacher = get_model_state_dict(self._teacher, options=opts)
        if self.rank != 0:
            return {}
        tensors = {f"student.{k}": v for k, v in student.items()}
        tensors.update({f"teacher.{k}": v for k, v in teacher.items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def memory_report(self) -> dict[str, int]:
        trainable = [p for p in self._student.parameters() if p.requires_grad]
        return {
            "params": _local_bytes(self._student.parameters()),
            "grads": sum(_local(p).numel() * 4 for p in trainable),  # fp32 gradient shards (reduce_dtype)
            "optimizer": _local_bytes(t for s in self.optimizer.state.values() for t in s.values()
                                      if isinstance(t, torch.Tensor)),
            "teacher": _local_bytes(self._teacher.parameters()),
        }
