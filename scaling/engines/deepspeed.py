"""DeepSpeed ZeRO-1/2/3 with an fp32 EMA teacher partitioned exactly like the student.

The student, its optimizer (a plain ``torch.optim.AdamW``: DeepSpeed's own optimizers JIT-compile
C++ for minutes) and the LR schedule live in a ``deepspeed.initialize`` engine. The teacher never
enters that engine: it is an fp32 module held here, partitioned like the student, and updated after
every optimizer step with one fused ``torch._foreach_lerp_`` over this rank's teacher partition and
this rank's piece of the optimizer's **fp32 master** weights (never the bf16/fp16 copies), with no
communication (docs/data2vec.md §2.4; the measured cases are tests/test_engine_deepspeed.py).

ZeRO-3: a separate teacher partitioned by ``deepspeed.zero.Init(module=teacher.encoder, ...)``.
ZeRO-3's layout of a parameter depends only on its numel and the world size, so each teacher
parameter's ``ds_tensor`` lines up element for element with the student parameter of the same name
(checked by name at setup: ``ds_shape`` and ``ds_tensor.numel()``). The EMA pairs the teacher's
``ds_tensor`` with a cached view of ``fp32_partitioned_groups_flat`` at the student parameter's
``grad_position``; both are trimmed to the real elements, so the last rank's padding never enters.
The teacher forward gathers one block at a time (read-only ``GatheredParameters`` in forward hooks
on each ``encoder.blocks[i]``; the encoder's few parameters outside the blocks, e.g. the speech
input LayerNorm or the vision patch embedding, for the whole encoder forward). ``zero.Init(module=)``
keeps the teacher fp32 (``zero.Init(dtype=...)`` would not on the CPU accelerator) and leaves
``ds_persist`` False, so the persistence-threshold staleness of in-engine teachers cannot occur.

ZeRO-1/2 (choice): a **partitioned teacher aligned with the fp32 master partition**. The encoder's
parameters get their own optimizer param groups (encoder decay / no-decay, then the rest), and
ZeRO-1/2 flattens and partitions each group separately, so this rank's master partition of an
encoder group (``single_partition_of_fp32_groups[g]``) covers exactly its share of the encoder. The
teacher is one fp32 tensor per encoder group, of that partition's size: the EMA is one fused lerp
over 2 tensors with 0 collectives, and its memory is 1/world of the teacher. The teacher forward
all-gathers each teacher group once (``all_gather_into_tensor``, 1 call per group) and points the
teacher parameters at views of the gathered flat by the student parameter's offset (paired by name);
the full copy is freed after the forward. The alternatives were rejected: a replicated teacher fed
from the bit16 params is the EMA of rounded weights under bf16 (measured drift 2e-4..9e-4 at decay
0.9), and one fed from the master needs an all-gather per group in every EMA update; an in-engine
teacher is cast to bf16 by DeepSpeed and is not saved per rank on ZeRO-1.

Precision: bf16/fp16 make DeepSpeed hold a low-precision student; floating batch tensors are cast to
it before the forward. ``autocast()`` is the same as the single engine's, so the fp32 teacher
computes exactly as it does there. fp16 uses DeepSpeed's dynamic loss scaling (DeepSpeed refuses
fp16 where the accelerator reports no fp16 support, e.g. most CPUs).

State (every rank calls): DeepSpeed's engine, whose ``save_checkpoint`` holds student, optimizer,
scheduler and engine counters, and this rank's teacher partitions with their layout (names, groups,
offsets, shapes), which scaling.checkpoint's ``deepspeed`` format writes per rank (ZeRO-1/2
``client_state`` comes only from rank 0, so it cannot hold per-rank data).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from scaling.checkpoint.formats import clean_name
from scaling.config import EngineConfig, OptimConfig, ScheduleConfig, TrainConfig
from scaling.distributed import env_info, init_process_group
from scaling.engines.base import Engine, ProcessGroup, StepResult, pick_device, prepare_blocks, tensor_bytes
from scaling.optim import build_optimizer, build_scheduler, param_groups
from scaling.plan import BatchPlan
from scaling.teacher import EMATeacher

_BLOCKS = "blocks."


def _storage_id(t: torch.Tensor) -> int:
    """Which storage a tensor views; unlike data_ptr() it tells meta tensors apart (scaling.dry_run)."""
    return t.untyped_storage()._cdata


def _quiet_known_warnings() -> None:
    """The warnings a ZeRO run prints that say nothing about this run, filtered by exact message,
    category and module (each listed, with its cause, in docs/performance.md "Warnings")."""
    # DeepSpeed 0.19's comm layer calls the collectives torch 2.14 renamed (all_gather_into_tensor,
    # reduce_scatter_tensor -> *_single); the old names forward to the new ones unchanged. Printed
    # again whenever anything resets the warning registry (PIL's image opening in the loader does, once
    # per image), so a run printed one pair per rank and step.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\. "
        r"Please use `torch\.distributed\.(all_gather_single|reduce_scatter_single)` instead\.$",
        category=FutureWarning, module=r"torch\.distributed\.c10d_logger$")
    # ZeRO-3 hooks a module's backward through the tensors it returns and cannot see into the
    # dataclasses this project's modules return (FrontendOutput, EncoderOutput, ...). The parameters
    # that this would leave released in backward are registered as external parameters of the root
    # (_keep_dataclass_owners_gathered); ZeRO-3 runs equal the single-process run
    # (tests/test_engine_deepspeed.py). DeepSpeed logs it once per process, from rank 0, via logging.
    from deepspeed.utils import logger

    if not any(isinstance(f, _DataclassOutputFilter) for f in logger.filters):
        logger.addFilter(_DataclassOutputFilter())


class _DataclassOutputFilter(logging.Filter):
    _MESSAGE = re.compile(r"A module has unknown inputs or outputs type \(<class 'scaling\.models\.outputs\.\w+'>\) "
                          r"and the tensors embedded in it cannot be detected\.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.module == "utils"
                    and self._MESSAGE.match(record.getMessage()))


def _cpu_local_size() -> None:
    """DeepSpeed's CPU accelerator counts the ranks of a node from LOCAL_SIZE, which only its own
    launcher sets; without it, ``device_count()`` runs ``numactl --hardware`` in a subprocess, and
    ZeRO-3 asks in every gradient reduction: a fork per micro-batch (which also resets the warning
    registry, so every warning seen once is printed again). torchrun's LOCAL_WORLD_SIZE is that count."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])


def _skip_cpu_shm_build() -> None:
    """On the CPU accelerator every TorchBackend init JIT-builds DeepSpeed's shared-memory comm op
    (35-45 s with gcc the first time on a machine); gloo collectives work without it, so skip it.
    Must patch through sys.modules: ``deepspeed.comm.torch`` as an attribute is the real torch."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.comm.torch  # noqa: F401  (load the module so that sys.modules has it)

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        _cpu_local_size()


class _StudentCall(nn.Module):
    """``engine.model``: casts floating batch tensors (audio, images) to the DeepSpeed student's dtype."""

    def __init__(self, ds_engine: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.ds = ds_engine
        self.dtype = dtype

    def forward(self, batch: dict):
        if self.dtype != torch.float32:
            batch = {k: v.to(self.dtype) if torch.is_floating_point(v) else v for k, v in batch.items()}
        return self.ds(batch)


class DeepSpeedEngine(ProcessGroup, Engine):
    checkpoint_format = "deepspeed"

    def __init__(self, engine_cfg: EngineConfig, train_cfg: TrainConfig):
        super().__init__(engine_cfg, train_cfg)
        if engine_cfg.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 1, 2 or 3 for deepspeed, got {engine_cfg.zero_stage}")
        self.stage = engine_cfg.zero_stage
        if engine_cfg.compile and self.stage == 3:
            # ZeRO-3 gathers each submodule's parameters in its own forward hooks, which a compiled block
            # would have to trace; not verified here. ZeRO-1/2 hold whole parameters and compile as single.
            raise ValueError("engine.compile: true is not supported with deepspeed zero_stage 3; use engine.name=fsdp "
                             "(sharded like ZeRO-3, compiled per block) or zero_stage 1/2, or engine.compile=false")
        self.device = pick_device(train_cfg.device, env_info().local_rank)
        _skip_cpu_shm_build()
        import deepspeed

        _quiet_known_warnings()

        info = init_process_group(engine_cfg.backend, self.device, engine_cfg.timeout_s)
        # DeepSpeed adopts the process group that already exists (no MPI discovery); the timeout is
        # the one it would give a group of its own.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=engine_cfg.timeout_s))
        self.rank, self.world_size = info.rank, info.world_size

    # ------------------------------------------------------------------ building
    def ds_config(self, optim_cfg: OptimConfig, plan: BatchPlan) -> dict:
        return {
            # Only DeepSpeed's bookkeeping reads it (we split the batch); audio batches vary in size.
            "train_micro_batch_size_per_gpu": max(1, plan.micro_batch_size),
            "gradient_accumulation_steps": plan.accumulation,
            "gradient_clipping": float(optim_cfg.grad_clip),
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "zero_optimization": {"stage": self.stage},
            "bf16": {"enabled": self.precision == "bf16"},
            # Dynamic loss scaling (loss_scale 0), as fairseq's fp16 trainer.
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        }

    def setup(self, student, teacher, optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, max_steps: int,
              plan: BatchPlan):
        import deepspeed

        if plan.world_size != self.world_size:
            raise ValueError(f"batch plan for world size {plan.world_size}, but {self.world_size} ranks run")
        if teacher is None:  # zero.Init partitions a real module; its values are replaced by the masters' below
            teacher = EMATeacher(student.encoder)
        prepare_blocks(student, teacher, self.engine_cfg)  # DeepSpeed then partitions whole modules
        self.cfg = self.ds_config(optim_cfg, plan)
        # Encoder parameters in their own groups (ZeRO-1/2 partitions each group separately: the
        # teacher is aligned with the encoder groups' master partitions). Same decay rule as
        # scaling.optim.param_groups, so the update equals the single engine's.
        rest = nn.ModuleList([m for name, m in student.named_children() if name != "encoder"])
        encoder_groups = [g for g in param_groups(student.encoder, optim_cfg.weight_decay) if g["params"]]
        groups = encoder_groups + [g for g in param_groups(rest, optim_cfg.weight_decay) if g["params"]]
        self._num_encoder_groups = len(encoder_groups)
        optimizer = build_optimizer(student, optim_cfg, groups)
        scheduler = build_scheduler(optimizer, schedule_cfg, max_steps)
        # DeepSpeed steps the scheduler on every optimizer step (not on skipped fp16 overflow steps)
        # and saves/restores it in its checkpoint.
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=self.cfg)
        self.dtype = next(self.ds.module.parameters()).dtype
        if self.stage == 3:
            self._keep_dataclass_owners_gathered(deepspeed)
        self._model = _StudentCall(self.ds, self.dtype)
        self._teacher = teacher
        self._hooks = []
        if self.stage == 3:
            self._setup_teacher_z3(deepspeed)
        else:
            self._setup_teacher_z12()

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    def _keep_dataclass_owners_gathered(self, deepspeed) -> None:
        """ZeRO-3 re-gathers a module's own parameters for backward from hooks on the tensors the module
        returns; it cannot see inside the dataclasses that the student, its frontend and its encoder
        return. While the first step records its trace, ZeRO-3 releases every parameter after its
        module's forward (persistent ones too), so e.g. the vision ``cls_token`` reached backward
        released ("The size of tensor a (0) must match the size of tensor b (64)" in AccumulateGrad).
        Their few directly-owned parameters (mask embedding, CLS/mask tokens) are made external
        parameters of the root: gathered by its forward and never released by a submodule's."""
        root = self.ds.module
        for module in (root, root.frontend, root.encoder):
            for p in module.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(root, p)
                p.is_external_param = True

    # ------------------------------------------------------------------ ZeRO-3 teacher
    def _setup_teacher_z3(self, deepspeed) -> None:
        enc = self._teacher.encoder.to(self.device)
        # Partitions in place without casting (zero.Init(dtype=fp32) gives bf16 on the CPU accelerator).
        deepspeed.zero.Init(module=enc, config_dict_or_path=self.cfg)
        enc.requires_grad_(False)
        student = dict(self.ds.module.encoder.named_parameters())
        self._t_named = list(enc.named_parameters())
        assert len(self._t_named) == len(student), "the teacher must cover every student encoder parameter"
        for name, t in self._t_named:
            s = student.get(name)
            assert s is not None, f"teacher parameter {name} has no student counterpart"
            assert t.ds_tensor.dtype == torch.float32, f"{name}: teacher partition is {t.ds_tensor.dtype}, not fp32"
            assert tuple(t.ds_shape) == tuple(s.ds_shape) and t.ds_tensor.numel() == s.ds_tensor.numel(), \
                f"{name}: teacher partition {tuple(t.ds_shape)}/{t.ds_tensor.numel()} != student " \
                f"{tuple(s.ds_shape)}/{s.ds_tensor.numel()}"
            # A persistent param would stay gathered and go stale after the EMA (pitfall 4).
            assert not getattr(t, "ds_persist", False), f"{name}: teacher parameter is persistent"
        self._build_ema_views_z3()
        with torch.no_grad():  # start from the student's fp32 master, locally; zero the padding
            for _, t in self._t_named:
                t.ds_tensor.zero_()
            torch._foreach_copy_(*self._ema)

        def gather(params):
            open_ctx = []

            def pre(module, args):
                ctx = deepspeed.zero.GatheredParameters(params)  # read-only: no modifier_rank
                ctx.__enter__()
                open_ctx.append(ctx)

            def post(module, args, output):
                open_ctx.pop().__exit__(None, None, None)

            return pre, post

        outside = [p for n, p in enc.named_parameters() if not n.startswith(_BLOCKS)]
        units = [(enc, outside)] if outside else []
        units += [(block, list(block.parameters())) for block in enc.blocks]
        for module, params in units:
            pre, post = gather(params)
            self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _build_ema_views_z3(self) -> None:
        """(teacher ds_tensor, student fp32 master) views of this rank's real elements, paired by name."""
        opt = self.ds.optimizer
        student = dict(self.ds.module.encoder.named_parameters())
        t_list, s_list = [], []
        for name, t in self._t_named:
            s = student[name]
            g, offset, n = opt.grad_position[opt.get_param_id(s)]
            real = max(0, min(n, s.ds_numel - self.rank * n))  # the last rank's tail is padding
            if real:
                t_list.append(t.ds_tensor.narrow(0, 0, real))
                s_list.append(opt.fp32_partitioned_groups_flat[g].narrow(0, offset, real))
        assert all(x.dtype == torch.float32 for x in t_list + s_list)
        self._ema = (t_list, s_list)

    # ------------------------------------------------------------------ ZeRO-1/2 teacher
    def _z12(self):
        """Name-independent access to the ZeRO-1/2 optimizer's flats (DeepSpeedZeroOptimizer or
        BF16_Optimizer): (bit16 param lists, bit16 flats, fp32 master partitions)."""
        opt = self.ds.optimizer
        if hasattr(opt, "single_partition_of_fp32_groups"):
            return opt.bit16_groups, opt.bit16_groups_flat, opt.single_partition_of_fp32_groups
        return opt.bf16_groups, opt.bf16_groups_flat, opt.fp32_groups_flat_partition

    def _setup_teacher_z12(self) -> None:
        groups, flats, masters = self._z12()
        encoder_ids = {id(p) for p in self.ds.module.encoder.parameters()}
        self._tgroups = list(range(self._num_encoder_groups))
        for g, params in enumerate(groups):
            inside = [id(p) in encoder_ids for p in params]
            assert all(inside) if g in self._tgroups else not any(inside), \
                f"optimizer group {g} mixes encoder and other parameters"
        where = {}  # student param id -> (group, offset in the flat)
        for g in self._tgroups:
            base, size = flats[g].data_ptr(), flats[g].element_size()
            for p in groups[g]:
                where[id(p)] = (g, (p.data_ptr() - base) // size)
        enc = self._teacher.encoder.to(self.device)  # buffers, if any; the full params are dropped below
        enc.requires_grad_(False)
        student = dict(self.ds.module.encoder.named_parameters())
        self._t_layout = []  # (teacher param, group, offset, shape), paired by name
        for name, t in enc.named_parameters():
            s = student.get(name)
            assert s is not None, f"teacher parameter {name} has no student counterpart"
            assert t.shape == s.shape and t.dtype == torch.float32, f"{name}: {t.shape}/{t.dtype} vs {s.shape}"
            self._t_layout.append((t, *where[id(s)], t.shape))
        assert len(self._t_layout) == len(student), "the teacher must cover every student encoder parameter"
        with torch.no_grad():
            self._tparts = [masters[g].detach().clone().float() for g in self._tgroups]
            for t in enc.parameters():  # the full copy is dropped: only the partition is kept
                t.data = torch.empty(0, dtype=torch.float32, device=self.device)
        self._hooks += [enc.register_forward_pre_hook(lambda m, a: self._materialize_z12()),
                        enc.register_forward_hook(lambda m, a, o: self._release_z12())]

    def _gather_z12(self) -> list[torch.Tensor]:
        """All-gather each teacher group's partitions into its full flat (1 collective per group)."""
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # new name in torch 2.14
        fulls = []
        for part in self._tparts:
            full = torch.empty(part.numel() * self.world_size, dtype=part.dtype, device=part.device)
            all_gather(full, part, group=self.ds.optimizer.dp_process_group)
            fulls.append(full)
        return fulls

    def _materialize_z12(self) -> None:
        fulls = dict(zip(self._tgroups, self._gather_z12()))
        for t, g, offset, shape in self._t_layout:
            t.data = fulls[g].narrow(0, offset, shape.numel()).view(shape)

    def _release_z12(self) -> None:
        for t, *_ in self._t_layout:
            t.data = torch.empty(0, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ one optimizer step
    @contextlib.contextmanager
    def micro_batch(self, *, last: bool):
        # DeepSpeed counts micro-batches itself (gradient_accumulation_steps in its config) and reduces at
        # its accumulation boundary: ZeRO-1 all-reduces once per optimizer step; ZeRO-2/3 reduce-scatter
        # in every backward into their gradient partitions (that is what keeps their gradient memory at
        # 1/world). The boundary must agree with the trainer's micro-batch count.
        assert self.ds.is_gradient_accumulation_boundary() == last, \
            "DeepSpeed's accumulation boundary disagrees with the trainer's micro-batch count"
        yield
        if not last:
            self.ds.step()  # DeepSpeed's per-micro-batch bookkeeping; the optimizer steps at the boundary

    def backward(self, loss):
        # The trainer normalised the loss over the whole global batch: no division by accumulation.
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, loss: torch.Tensor, *, stop: bool = False) -> StepResult:
        """DeepSpeed's step clips, steps optimizer and LR scheduler and zeroes the gradients in one call,
        and makes the skip decision itself: every ZeRO stage (as of deepspeed 0.19) skips a step whose
        gradient norm is not finite (fp16 overflow; bf16 with its default ``check_grad_overflow``;
        fp32), without an optimizer or LR-scheduler step; ``was_step_applied()`` says so, alike on every
        rank, and the EMA is skipped with it. A non-finite loss with finite gradients (not seen in
        practice) counts as skipped as well, though DeepSpeed has stepped."""
        steps = self.ds.global_steps
        self.ds.step()  # clip (config), optimizer, LR scheduler, zero grads
        assert self.ds.global_steps == steps + 1, "DeepSpeed did not take an optimizer step at the boundary"
        norm = self.ds.get_global_grad_norm()  # before clipping; DeepSpeed's own step reads it on the host
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        bad_loss = ~torch.isfinite(loss.detach().double().sum())
        flags = torch.stack([bad_loss.double(), torch.full((), float(stop), dtype=torch.float64, device=loss.device)])
        bad_loss, stop = (bool(x) for x in self.all_reduce_max(flags.to(self.device)).tolist())
        scale = getattr(self.ds.optimizer, "loss_scale", None) if self.precision == "fp16" else None
        return StepResult(norm, applied=self.ds.was_step_applied() and not bad_loss, stop=stop,
                          loss_scale=None if scale is None else float(scale))

    def ema_tensors(self):
        if self.stage == 3:
            return self._ema
        masters = self._z12()[2]
        return self._tparts, [masters[g] for g in self._tgroups]

    # ------------------------------------------------------------------ collectives
    # ------------------------------------------------------------------ state
    def _teacher_parts(self) -> tuple[list[str], list[torch.Tensor]]:
        if self.stage == 3:
            return [clean_name(n) for n, _ in self._t_named], [t.ds_tensor for _, t in self._t_named]
        return [f"group{g}" for g in self._tgroups], self._tparts

    def _teacher_layout(self) -> dict:
        """What a reader needs to put the partitions back together by name (scaling/checkpoint/formats.py)."""
        layout = {"stage": self.stage, "world_size": self.world_size}
        if self.stage == 3:
            layout["params"] = {clean_name(n): {"shape": list(t.ds_shape), "partition": t.ds_tensor.numel()}
                                for n, t in self._t_named}
            return layout
        names = {id(t): clean_name(n) for n, t in self._teacher.encoder.named_parameters()}
        layout["partitions"] = {f"group{g}": part.numel() for g, part in zip(self._tgroups, self._tparts)}
        layout["params"] = {names[id(t)]: {"group": f"group{g}", "offset": offset, "shape": list(shape)}
                            for t, g, offset, shape in self._t_layout}
        return layout

    def state_dict(self) -> dict:
        names, parts = self._teacher_parts()
        return {"deepspeed": self.ds, "teacher": dict(zip(names, parts)), "teacher_layout": self._teacher_layout()}

    def load_state_dict(self, state: dict) -> None:
        """The teacher partitions (DeepSpeed's own load_checkpoint restored the rest)."""
        names, parts = self._teacher_parts()
        with torch.no_grad():
            for name, dst in zip(names, parts):
                dst.copy_(state["teacher"][name])
        if self.stage == 3:  # the loaded master may live in new storage: rebuild the EMA views
            self._build_ema_views_z3()

    def named_local_tensors(self):
        masters = list(self.ds.optimizer.fp32_partitioned_groups_flat) if self.stage == 3 else list(self._z12()[2])
        names, parts = self._teacher_parts()
        return [(f"student.fp32_master_group{g}", m) for g, m in enumerate(masters)] + \
            [(f"teacher.{n}", t) for n, t in zip(names, parts)]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors on rank 0 (every rank must call: gathers per parameter)."""
        from deepspeed.utils import safe_get_full_fp32_param

        # keep_vars=True: parameters come back as the Parameter objects, under the state-dict keys
        # (which drop activation-checkpointing wrapper prefixes, as the single engine's do).
        out = {}
        for key, value in self.ds.module.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                full = safe_get_full_fp32_param(value) if value.requires_grad else None
                if full is None:
                    full = self._gathered(value).float()
                value = full.view(value.ds_shape if hasattr(value, "ds_shape") else value.shape)
            out[f"student.{key}"] = value.detach().cpu().clone()
        layout = {id(t): (g, offset, shape) for t, g, offset, shape in getattr(self, "_t_layout", [])}
        fulls = dict(zip(self._tgroups, self._gather_z12())) if self.stage != 3 else None
        for key, value in self._teacher.encoder.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter) and self.stage == 3:
                value = self._gathered(value)
            elif isinstance(value, nn.Parameter):
                g, offset, shape = layout[id(value)]
                value = fulls[g].narrow(0, offset, shape.numel()).view(shape)
            out[f"teacher.encoder.{key}"] = value.detach().cpu().clone()
        return out if self.rank == 0 else {}

    @staticmethod
    def _gathered(p: torch.Tensor) -> torch.Tensor:
        if not hasattr(p, "ds_id"):
            return p.data
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.clone()

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds. params: the student as DeepSpeed holds it (ZeRO-3: partitions plus
        any persistent gathered params; ZeRO-1/2: the full low-precision flats); grads: what is kept
        from backward to step (ZeRO-1: full, ZeRO-2/3: this rank's partition, in the student dtype);
        optimizer: fp32 master partitions (when not the params themselves) and AdamW state; teacher:
        this rank's fp32 partition."""
        opt = self.ds.optimizer
        student = list(self.ds.module.parameters())
        elsize = torch.tensor([], dtype=self.dtype).element_size()
        if self.stage == 3:
            params = tensor_bytes(p.ds_tensor for p in student) + tensor_bytes(p.data for p in student)
            masters = list(opt.fp32_partitioned_groups_flat)
            low = {_storage_id(t) for t in opt.fp16_partitioned_groups_flat}
            grads = sum(p.ds_tensor.numel() for p in student if p.requires_grad) * elsize
        else:
            _, flats, masters = self._z12()
            masters = list(masters)
            low = {_storage_id(t) for t in flats}
            params = tensor_bytes(flats)
            grads = (sum(f.numel() for f in flats) if self.stage == 1 else sum(m.numel() for m in masters)) * elsize
        state = [t for s in opt.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0]
        own_masters = [m for m in masters if _storage_id(m) not in low]
        _, parts = self._teacher_parts()
        return {"params": params, "grads": grads, "optimizer": tensor_bytes(own_masters + state),
                "teacher": tensor_bytes(parts)}

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        super().close()
        # Let a later engine in this process re-adopt a fresh process group.
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None
