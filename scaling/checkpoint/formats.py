"""The on-disk formats of an engine's state: for each, the writer, the reader used on resume, and the
offline reader that gives one part's tensors in one process with no process group.

An engine names its format (``engine.checkpoint_format``) and hands its state over as
``engine.state_dict()`` / ``engine.load_state_dict(state)``; only this module knows the files:

| format | engines | files in the step directory |
|---|---|---|
| ``full`` | single, ddp | ``model.safetensors`` (``student.*``, ``teacher.*``), ``optimizer.pt`` (optimizer, scheduler, scaler) |
| ``dcp`` | fsdp | ``dcp/`` (torch.distributed.checkpoint: student, teacher, optimizer; every rank its shards), ``scheduler.pt`` |
| ``deepspeed`` | deepspeed | ``deepspeed/`` (DeepSpeed's ``save_checkpoint``: student, optimizer, scheduler), ``teacher_rank{r}.safetensors`` |

Tensor names. ``student.<name>`` are the keys of ``Data2Vec.state_dict()``; ``teacher.<name>`` those of
``EMATeacher.state_dict()`` (``teacher.encoder.*``). A part read offline drops its prefix, so a
student part loads into ``Data2Vec`` and a teacher part's keys (``encoder.*``) replace the student's
encoder in it.

DeepSpeed teacher partitions (``teacher_rank{r}.safetensors``; the safetensors metadata entry
``layout`` is JSON). ZeRO-3: one tensor per teacher parameter, this rank's ``ds_tensor`` (the
parameter flattened and padded to ``partition * world_size`` elements, rank r holding
``[r * partition, (r + 1) * partition)``). ZeRO-1/2: one flat tensor per encoder optimizer group
(``group{g}``), this rank's ``partition`` elements of the group's padded flat; each parameter is
recorded with its group, its offset in that flat and its shape. Either way a parameter is read back
by name from every rank's file.

DeepSpeed student (offline). DeepSpeed keeps the fp32 master weights in each rank's
``*zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (``single_partition_of_fp32_groups`` for ZeRO-1/2,
``fp32_flat_groups`` for ZeRO-3) and the parameter names and shapes, in flat order, in
``mp_rank_00_model_states.pt`` (``param_shapes``). The layout rules are DeepSpeed's own
(``deepspeed/utils/zero_to_fp32.py``): ZeRO-1/2 parameters lie one after the other in their group's
flat (plus ``param_alignment_paddings`` where recorded), which is cut into equal rank partitions;
ZeRO-3 partitions every parameter on its own (``ceil(numel / world)`` elements per rank), and each
rank's groups, concatenated, hold its partitions in ``param_shapes`` order. Files are memory-mapped
and re-opened for each run of tensors read together, so mapped pages do not accumulate.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from scaling.checkpoint.safe import (
    CheckpointError,
    dcp_load,
    load_dcp_metadata,
    load_torch,
    open_safetensors,
    read_safetensors,
)

PARTS = ("student", "teacher")
# Activation checkpointing wraps each block: state_dict() drops this from its keys, named_parameters() does not.
_WRAPPER = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    return name.replace(_WRAPPER, "")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorSource:
    """One part's tensors in a checkpoint, by name: ``read(names)`` materialises just those."""

    def __init__(self, infos: dict[str, TensorInfo], read_one: Callable[[str], torch.Tensor] | None = None,
                 read_many: Callable[[list[str]], dict[str, torch.Tensor]] | None = None):
        assert (read_one is None) != (read_many is None)
        self.infos = infos
        self._read_many = read_many or (lambda names: {n: read_one(n) for n in names})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = self._read_many(names)
        for name in names:
            info = self.infos[name]
            t = out[name]
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype, (name, tuple(t.shape), t.dtype, info)
        return out

    def batches(self, budget_bytes: int) -> list[list[str]]:
        """The names in order, in runs of at most ``budget_bytes`` (a larger tensor alone): what one
        read should ask for when memory is to stay bounded (one DCP load per run, not per tensor)."""
        runs, size = [[]], 0
        for name, info in self.infos.items():
            if runs[-1] and size + info.nbytes > budget_bytes:
                runs.append([])
                size = 0
            runs[-1].append(name)
            size += info.nbytes
        return [r for r in runs if r]


# ============================================================================= full (single, ddp)
class FullFormat:
    MODEL = "model.safetensors"
    OPTIM = "optimizer.pt"

    @classmethod
    def save(cls, engine, ckpt: Path) -> None:
        from safetensors.torch import save_file

        if engine.rank != 0:  # replicated state: one writer
            return
        state = engine.state_dict()
        save_file(state.pop("model"), ckpt / cls.MODEL)
        torch.save(state, ckpt / cls.OPTIM)

    @classmethod
    def load(cls, engine, ckpt: Path) -> None:
        model, _ = read_safetensors(ckpt / cls.MODEL)
        engine.load_state_dict({"model": model, **load_torch(ckpt / cls.OPTIM)})

    @classmethod
    def source(cls, ckpt: Path, part: str, meta: dict) -> TensorSource:
        path, prefix = ckpt / cls.MODEL, f"{part}."
        with open_safetensors(path) as f:
            infos = {k[len(prefix):]: _safetensors_info(f.get_slice(k)) for k in f.keys() if k.startswith(prefix)}

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            with open_safetensors(path) as f:  # re-opened per read: the previous memory map is dropped
                return {n: f.get_tensor(prefix + n) for n in names}

        return TensorSource(infos, read_many=read)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_info(s) -> TensorInfo:
    return TensorInfo(tuple(s.get_shape()), SAFETENSORS_DTYPES[s.get_dtype()])


# ============================================================================= dcp (fsdp)
class DCPFormat:
    DIR = "dcp"
    SCHEDULER = "scheduler.pt"
    SHARDED = ("student", "teacher", "optim")  # the DCP part of FSDPEngine.state_dict()

    @classmethod
    def save(cls, engine, ckpt: Path, *, async_group=None):
        """Write every rank's shards. With ``async_group``: stage them to host memory now and write them
        in a background thread whose collectives use that group, not the training one; returns the
        future of the write (None otherwise)."""
        import torch.distributed.checkpoint as dcp

        state = engine.state_dict()
        sharded = {k: state[k] for k in cls.SHARDED}
        future = None
        if async_group is None:
            dcp.save(sharded, checkpoint_id=ckpt / cls.DIR)
        else:
            future = dcp.async_save(sharded, checkpoint_id=ckpt / cls.DIR, process_group=async_group)
        if engine.rank == 0:
            torch.save({"scheduler": state["scheduler"]}, ckpt / cls.SCHEDULER)
        return future

    @classmethod
    def load(cls, engine, ckpt: Path) -> None:
        state = engine.state_dict()
        sharded = {k: state[k] for k in cls.SHARDED}
        dcp_load(sharded, ckpt / cls.DIR)  # in place, resharded to this run's layout
        engine.load_state_dict({**sharded, "scheduler": load_torch(ckpt / cls.SCHEDULER)["scheduler"]})

    @classmethod
    def source(cls, ckpt: Path, part: str, meta: dict) -> TensorSource:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = load_dcp_metadata(ckpt / cls.DIR / ".metadata")
        prefix = f"{part}."
        infos = {fqn[len(prefix):]: TensorInfo(tuple(md.size), md.properties.dtype)
                 for fqn, md in metadata.state_dict_metadata.items()
                 if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)}

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            # One load for all of them: each load reads the whole metadata and plans, which per tensor
            # would cost O(tensors^2) on a large model.
            state = {prefix + n: torch.empty(infos[n].shape, dtype=infos[n].dtype) for n in names}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load(state, ckpt / cls.DIR, no_dist=True)
            return {n: state[prefix + n] for n in names}

        return TensorSource(infos, read_many=read)


# ============================================================================= deepspeed
class DeepSpeedFormat:
    TAG = "deepspeed"  # save_checkpoint's sub-directory
    # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_{r}_mp_rank_00_model_states.pt per
    # rank; every copy holds the same parameter names and shapes.
    _MODEL_STATES = re.compile(r"^(?:zero_pp_rank_0_)?mp_rank_00_model_states\.pt$")
    _OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")

    @staticmethod
    def teacher_file(ckpt: Path, rank: int) -> Path:
        return ckpt / f"teacher_rank{rank}.safetensors"

    @classmethod
    def save(cls, engine, ckpt: Path) -> None:
        from safetensors.torch import save_file

        state = engine.state_dict()
        state["deepspeed"].save_checkpoint(str(ckpt), tag=cls.TAG, save_latest=False)
        save_file({k: v.detach().cpu().contiguous() for k, v in state["teacher"].items()},
                  cls.teacher_file(ckpt, engine.rank), metadata={"layout": json.dumps(state["teacher_layout"])})

    @classmethod
    def load(cls, engine, ckpt: Path) -> None:
        state = engine.state_dict()
        ds = state["deepspeed"]
        ds.checkpoint_engine = _safe_checkpoint_engine(ds.checkpoint_engine)
        try:
            path, _ = ds.load_checkpoint(str(ckpt), tag=cls.TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except Exception as exn:  # noqa: BLE001  (DeepSpeed's own errors about its files)
            raise CheckpointError(f"{ckpt / cls.TAG}: DeepSpeed cannot load it ({type(exn).__name__}: {exn})") from None
        if path is None:
            raise CheckpointError(f"{ckpt / cls.TAG}: no DeepSpeed checkpoint")
        layout, tensors = cls._read_teacher_file(cls.teacher_file(ckpt, engine.rank))
        if layout != state["teacher_layout"]:
            raise CheckpointError(f"{cls.teacher_file(ckpt, engine.rank)}: teacher partitions of ZeRO-"
                                  f"{layout.get('stage')} on {layout.get('world_size')} ranks, laid out for another "
                                  f"model or world; this run is ZeRO-{state['teacher_layout']['stage']} on "
                                  f"{state['teacher_layout']['world_size']} ranks")
        engine.load_state_dict({"teacher": tensors})

    @classmethod
    def _read_teacher_file(cls, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors, metadata = read_safetensors(path)
        return cls._layout(path, metadata), tensors

    @staticmethod
    def _layout(path: Path, metadata: dict | None) -> dict:
        try:
            layout = json.loads((metadata or {})["layout"])
            assert isinstance(layout, dict) and {"stage", "world_size", "params"} <= set(layout)
        except (KeyError, ValueError, AssertionError):
            raise CheckpointError(f"{path}: damaged, no teacher partition layout in its metadata") from None
        return layout

    # ------------------------------------------------------------------ offline
    @classmethod
    def source(cls, ckpt: Path, part: str, meta: dict) -> TensorSource:
        world = int(meta["world_size"])
        return cls._teacher_source(ckpt, world) if part == "teacher" else cls._student_source(ckpt, world)

    @classmethod
    def _teacher_source(cls, ckpt: Path, world: int) -> TensorSource:
        files = [cls.teacher_file(ckpt, r) for r in range(world)]
        with open_safetensors(files[0]) as f:
            layout = cls._layout(files[0], f.metadata())
        infos = {f"encoder.{name}": TensorInfo(tuple(p["shape"]), torch.float32) for name, p in layout["params"].items()}

        def ranges(name: str) -> tuple[str, list[tuple[int, int, int]]]:
            """The safetensors key, and (rank, start, stop) of this parameter's elements in each file."""
            p = layout["params"][name[len("encoder."):]]
            numel = math.prod(p["shape"])
            if layout["stage"] == 3:  # every rank holds `partition` elements of this parameter
                key, start, partition = name[len("encoder."):], 0, p["partition"]
            else:  # a range of the group's flat, which the ranks hold in equal consecutive slices
                key, start, partition = p["group"], p["offset"], layout["partitions"][p["group"]]
            return key, [(r, max(start, r * partition) - r * partition, min(start + numel, (r + 1) * partition) -
                          r * partition) for r in range(start // partition, (start + numel - 1) // partition + 1)]

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            wanted = {n: ranges(n) for n in names}
            pieces: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for r in range(world):  # each file opened once per run of tensors
                here = [(n, key, lo, hi) for n, (key, spans) in wanted.items() for rank, lo, hi in spans if rank == r]
                if here:
                    with open_safetensors(files[r]) as f:
                        for n, key, lo, hi in here:
                            pieces[n].append(f.get_slice(key)[lo:hi])
            return {n: torch.cat(pieces[n]).view(infos[n].shape) for n in names}

        return TensorSource(infos, read_many=read)

    @classmethod
    def _student_source(cls, ckpt: Path, world: int) -> TensorSource:
        ds_dir = ckpt / cls.TAG
        names = sorted(p.name for p in ds_dir.iterdir()) if ds_dir.is_dir() else []
        model_file = next((ds_dir / n for n in names if cls._MODEL_STATES.match(n)), ds_dir / "mp_rank_00_model_states.pt")
        model_states = load_torch(model_file, deepspeed=True, mmap=True)
        if model_states.get("frozen_param_shapes") or model_states.get("shared_params"):
            raise CheckpointError(f"{model_file}: frozen or shared parameters, which this reader does not reassemble")
        optim_files = {int(m.group(1)): ds_dir / m.group(0) for m in map(cls._OPTIM_STATES.match, names) if m}
        if sorted(optim_files) != list(range(world)):
            raise CheckpointError(f"{ds_dir}: optimizer state files of ranks {sorted(optim_files)}; meta.json records "
                                  f"{world} ranks")
        files = [optim_files[r] for r in range(world)]

        def flats(rank: int) -> tuple[dict, list[torch.Tensor]]:
            osd = load_torch(files[rank], deepspeed=True, mmap=True)["optimizer_state_dict"]
            key = "fp32_flat_groups" if int(osd["zero_stage"]) == 3 else "single_partition_of_fp32_groups"
            return osd, list(osd[key])

        osd, first = flats(0)
        stage, sizes = int(osd["zero_stage"]), [t.numel() for t in first]
        paddings = osd.get("param_alignment_paddings")
        # name -> (shape, [(group, start, stop)] in the every-rank coordinates of that stage's layout)
        where: dict[str, tuple[tuple[int, ...], list[tuple[int, int, int]]]] = {}
        if stage == 3:
            offset, bounds = 0, [0, *itertools.accumulate(sizes)]
            for shapes in model_states["param_shapes"]:
                for name, shape in shapes.items():
                    partition = math.ceil(math.prod(shape) / world)
                    where[clean_name(name)] = (tuple(shape), _split(offset, partition, bounds))
                    offset += partition
        else:
            for g, shapes in enumerate(model_states["param_shapes"]):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    where[clean_name(name)] = (tuple(shape), [(g, offset, offset + math.prod(shape))])
                    offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
        infos = {name: TensorInfo(shape, torch.float32) for name, (shape, _) in where.items()}

        def holds(rank: int, name: str) -> bool:
            return stage == 3 or any(_overlap(a, b, rank * sizes[g], (rank + 1) * sizes[g]) for g, a, b in where[name][1])

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            pieces: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for rank in range(world):
                here = [n for n in names if holds(rank, n)]
                if not here:
                    continue
                _, groups = flats(rank)  # mapped again per run of tensors: only the touched pages are read
                assert [t.numel() for t in groups] == sizes, f"{files[rank]}: partitions differ from rank 0's"
                for n in here:
                    for g, a, b in where[n][1]:
                        if stage == 3:  # each rank holds this parameter's own partition at [a, b) of group g
                            pieces[n].append(groups[g][a:b].clone())
                        else:  # the group's flat [a, b), of which this rank holds [rank * size, (rank + 1) * size)
                            lo, hi = max(a, rank * sizes[g]), min(b, (rank + 1) * sizes[g])
                            if lo < hi:
                                pieces[n].append(groups[g][lo - rank * sizes[g]:hi - rank * sizes[g]].clone())
                del groups
            return {n: torch.cat(pieces[n])[: math.prod(infos[n].shape)].view(infos[n].shape) for n in names}

        return TensorSource(infos, read_many=read)


def _split(offset: int, count: int, bounds: list[int]) -> list[tuple[int, int, int]]:
    """[offset, offset + count) of a concatenation of groups with these cumulative bounds, as
    (group, start, stop) ranges inside the groups."""
    spans, end = [], offset + count
    for g in range(len(bounds) - 1):
        lo, hi = max(offset, bounds[g]), min(end, bounds[g + 1])
        if lo < hi:
            spans.append((g, lo - bounds[g], hi - bounds[g]))
    return spans


def _overlap(a: int, b: int, lo: int, hi: int) -> bool:
    return max(a, lo) < min(b, hi)


def _safe_checkpoint_engine(current):
    """DeepSpeed's torch checkpoint engine with every ``load`` through :func:`load_torch` (its own uses
    ``weights_only=False``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):  # DeepSpeed asks for CPU tensors ('cpu' or an identity lambda)
            return load_torch(path, deepspeed=True)

    if isinstance(current, SafeTorchCheckpointEngine):
        return current
    assert type(current) is TorchCheckpointEngine, f"unexpected DeepSpeed checkpoint engine {type(current)}"
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    return safe


FORMATS = {"full": FullFormat, "dcp": DCPFormat, "deepspeed": DeepSpeedFormat}


def verify(ckpt: Path, meta: dict) -> None:
    """Open every file a reader of this checkpoint will unpickle or parse, with the same safe loaders
    and without reading tensor data: a planted payload is refused here, naming the file, before
    anything is built. (DCP's data files are not pickles at their top level; DCP reads their items
    with ``weights_only=True`` and :func:`scaling.checkpoint.safe.dcp_planner`.) Files no reader
    opens (DeepSpeed's copied zero_to_fp32.py, the COMPLETE marker) are never executed or read."""
    from scaling.checkpoint.layout import RECIPE
    from scaling.config import RecipeError, load_recipe

    for rel in meta.get("files", {}):
        path = ckpt / rel
        if path.suffix == ".pt":
            load_torch(path, deepspeed=path.parent.name == DeepSpeedFormat.TAG, mmap=True)
        elif path.suffix == ".safetensors":
            with open_safetensors(path) as f:
                f.metadata()
        elif path.name == ".metadata":
            load_dcp_metadata(path)
        elif rel == RECIPE:
            try:
                load_recipe(path)
            except RecipeError as exn:
                raise CheckpointError(str(exn)) from None
