"""Dry run: the real sharded student and EMA teacher at world size N, in one CPU process, unallocated.

``measure(recipe, world_size, row)`` joins a ``torch.distributed`` **fake** process group
(``FakeStore`` + backend ``"fake"``, torch.testing._internal.distributed.fake_pg: collectives
return at once, nothing is sent) as rank 0 of N, builds the student on the meta device, and runs
the engine's own ``__init__`` and ``setup()``, the code a training run calls (which also makes the
teacher, as in training), with ``engine.device`` set to meta. Then it creates
AdamW's state by one ``optimizer.step()`` over zero meta gradients and returns the engine's own
``memory_report()``: this rank's local bytes of params, grads, optimizer and teacher.

What is real and what is computed:

- fsdp: everything. ``FSDPEngine.setup`` applies activation checkpointing and ``fully_shard`` to
  every block and the root of student and teacher; the DTensors' local shards (meta) are the ones a
  training rank 0 holds; AdamW's moments are DTensors of those shards.
- deepspeed ZeRO-1/2/3: ``deepspeed.initialize`` and the teacher's ``deepspeed.zero.Init`` run for
  real on the fake group, with two patches while ``setup`` runs: DeepSpeed's accelerator reports the
  device ``meta`` (so its partitions, flats and masters are allocated as meta tensors instead of on
  the CPU), and ZeRO-3's ``defragment``, which bounces the partitions through a host buffer it
  allocates on ``"cpu"`` by name, lays them out in a meta buffer instead (same sizes and offsets).
  Partition sizes, padding and the optimizer's flats are DeepSpeed's own. Computed, not measured:
  ZeRO-3's persistent parameters (``ds_persist``, set by DeepSpeed) are gathered at the first
  forward, which a dry run does not run; their whole size in the student dtype is added to params.
- Not measured: activations and the transient all-gathered copies (``scaling.memory`` estimates
  them), and the exact batch split, which does not change these bytes (a world size that does not
  divide the global batch is run with micro-batch x world as the batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch
import torch.distributed as dist

from scaling.config import Recipe
from scaling.memory import KINDS, build_on_meta

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def fake_world(world_size: int):
    """Rank 0 of a fake process group of ``world_size`` (and the launcher's environment for it)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _deepspeed_on_meta():
    """DeepSpeed allocates its partitions on the accelerator's device: make that ``meta``."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.runtime.zero.stage3 as stage3
    from deepspeed.runtime.zero.utils import get_mapping_to_flat_buffer

    accel = get_accelerator()
    saved = {name: accel.__dict__.get(name) for name in ("device_name", "current_device_name")}
    defragment = stage3.defragment

    def defragment_on_meta(tensors):
        if tensors[0].device.type != "meta":
            return defragment(tensors)
        buffer = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device="meta")
        for tensor, offset, numel in get_mapping_to_flat_buffer(tensors):
            tensor.data = buffer.narrow(0, offset, numel)
        return buffer

    accel.device_name = lambda device_index=None: "meta"
    accel.current_device_name = lambda: "meta"
    stage3.defragment = defragment_on_meta
    try:
        yield
    finally:
        stage3.defragment = defragment
        for name, value in saved.items():
            if value is None:
                accel.__dict__.pop(name, None)
            else:
                setattr(accel, name, value)


def _forget_deepspeed_groups() -> None:
    """deepspeed.utils.groups caches the process groups of the first engine in module globals; once
    the fake group is destroyed, a second dry run in this process would meet them ("Group ... is not
    registered"). Back to the values the module starts with."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
        setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()


def _plan(recipe: Recipe, world_size: int):
    from scaling.plan import BatchPlan

    try:
        return BatchPlan.from_config(recipe.train, world_size, recipe.data.speech.sample_rate)
    except ValueError:  # the bytes measured here do not depend on the split
        micro = max(1, recipe.train.micro_batch_size)  # 0 (no bound) only with audio batches
        train = dataclasses.replace(recipe.train, global_batch_size=world_size * micro, global_batch_seconds=0.0,
                                    micro_batch_seconds=0.0)
        return BatchPlan.from_config(train, world_size)


def _engine_recipe(recipe: Recipe, row: str) -> Recipe:
    engine = recipe.engine
    if row.startswith("zero"):
        engine = dataclasses.replace(engine, name="deepspeed", zero_stage=int(row[-1]))
    elif row in ("fsdp", "ddp", "single"):
        engine = dataclasses.replace(engine, name=row)
    else:
        raise ValueError(f"engine {row!r}: expected fsdp, zero1, zero2 or zero3 for a dry run")
    precision = "bf16" if recipe.train.precision == "auto" else recipe.train.precision
    return dataclasses.replace(recipe, engine=engine, train=dataclasses.replace(recipe.train, device="cpu",
                                                                                  precision=precision))


def measure(recipe: Recipe, world_size: int, row: str = "fsdp") -> dict[str, int]:
    """This rank's (rank 0 of ``world_size``) bytes per kind, from the real engine on a fake group.
    ``row``: fsdp, zero1, zero2 or zero3. Also returns ``seconds`` (wall time of the dry run)."""
    from scaling.engines import build_engine

    if row not in ("fsdp", "zero1", "zero2", "zero3"):
        raise ValueError(f"--dry-run engine {row!r}: expected fsdp, zero1, zero2 or zero3 (single and ddp "
                         f"hold everything whole: the estimate is exact)")
    start = time.perf_counter()
    recipe = _engine_recipe(recipe, row)
    with fake_world(world_size):
        engine = build_engine(recipe.engine, recipe.train)
        try:
            engine.device = torch.device("meta")
            student = build_on_meta(recipe.model)
            args = (student, None, recipe.optim, recipe.schedule)  # the teacher as training makes it
            kwargs = dict(max_steps=recipe.train.max_steps, plan=_plan(recipe, world_size))
            if row == "fsdp":
                engine.setup(*args, **kwargs)
            else:
                with _deepspeed_on_meta():
                    engine.setup(*args, **kwargs)
            _create_adam_state(engine)
            report = dict(engine.memory_report())
            if row == "zero3":
                elsize = torch.tensor([], dtype=engine.dtype).element_size()
                report["params"] += sum(p.ds_numel for p in engine.ds.module.parameters()
                                        if getattr(p, "ds_persist", False)) * elsize
        finally:
            engine.close()
            if row != "fsdp":
                _forget_deepspeed_groups()
    report = {k: int(report[k]) for k in KINDS}
    report["seconds"] = time.perf_counter() - start
    return report


def _create_adam_state(engine) -> None:
    """AdamW creates its moments lazily in its first step: one step over zero (meta) gradients, through
    ZeRO-3's own per-sub-group step (it points the torch optimizer at one fp32 flat at a time)."""
    zero3 = getattr(engine, "stage", None) == 3
    if zero3:
        opt = engine.ds.optimizer
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            flat.grad = torch.zeros_like(flat)
            opt._optimizer_step(i)
            flat.grad = None
        return
    optimizer = engine.ds.optimizer.optimizer if hasattr(engine, "ds") else engine.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
