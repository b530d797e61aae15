"""Saving and resuming a run: atomic step directories, what made them, and what may resume from them.

Every rank calls :meth:`Checkpointer.save` and :meth:`Checkpointer.load`; the engine's files are
written and read by its format (scaling/checkpoint/formats.py). Before anything is built,
:func:`check_resume` compares a checkpoint's ``meta.json`` with the run about to resume from it.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
import shutil
from pathlib import Path

import torch

from scaling.checkpoint import layout
from scaling.checkpoint.formats import FORMATS, clean_name, verify
from scaling.checkpoint.safe import CheckpointError, load_torch
from scaling.config import CheckpointConfig, ModelConfig, Recipe, to_yaml

log = logging.getLogger("scaling.checkpoint")


class NonFiniteStateError(RuntimeError):
    """A save was refused because the student or the teacher holds NaN or inf; older checkpoints are kept."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def model_shape(cfg: ModelConfig) -> dict:
    """The model section that fixes the tensors' names and shapes (what a resume must not change)."""
    shape = dataclasses.asdict(cfg)
    shape.pop("init_from", None)  # where the weights came from, not what they are
    return shape


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("scaling", "torch", "deepspeed", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def resume_path(cfg: CheckpointConfig) -> Path | None:
    """The checkpoint a run with this section resumes from: none (``resume: never``), the newest
    intact one of ``checkpoint.dir`` (``auto``), or the one ``resume`` names (a checkpoint or a
    directory of them)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return layout.find_latest(Path(cfg.dir))
    return layout.resolve(cfg.resume)


# Model settings that change no tensor: a resume or model.init_from may change them.
REGULARISATION = {"model.dropout", "model.attention_dropout", "model.activation_dropout", "model.speech.feature_dropout",
                  "model.speech.layerdrop", "model.vision.drop_path"}


def model_changes(old: dict, new: dict, *, shared_only: bool = False) -> tuple[list[str], list[str]]:
    """Between two model sections (``model_shape``): (changes of the architecture, changes of
    :data:`REGULARISATION` settings), each ``model.key old -> new``. ``shared_only``: a key that
    only one side has is not a change."""
    changes = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for k in sorted(set(a) | set(b)):
            if shared_only and (k not in a or k not in b):
                continue
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, f"{prefix}{k}.")
            elif x != y:
                changes.append((f"{prefix}{k}", f"{prefix}{k} {x!r} -> {y!r}"))

    walk(old, new, "model.")
    return [c for k, c in changes if k not in REGULARISATION], [c for k, c in changes if k in REGULARISATION]


def check_resume(ckpt: Path, recipe: Recipe, *, world_size: int, checkpoint_format: str) -> list[str]:
    """Whether a run of ``recipe`` on ``world_size`` ranks, whose engine writes ``checkpoint_format``,
    can resume from ``ckpt``. Raises CheckpointError (one line) for what cannot resume: another engine
    format, another model architecture, a weights-only checkpoint, DeepSpeed on another ZeRO stage or
    world size. Returns warnings for what resumes but changes the run (``train.max_steps``, dropouts)."""
    meta = layout.check_intact(ckpt)
    verify(ckpt, meta)  # nothing below, and nothing the engine later reads, may run code
    if meta.get("weights_only"):
        raise CheckpointError(f"{ckpt} holds weights only (no optimizer or data state): start a run from it "
                              f"with --set model.init_from={ckpt}")
    if meta["checkpoint_format"] != checkpoint_format:
        raise CheckpointError(f"{ckpt} was written by engine {meta['engine']} ({meta['checkpoint_format']} files); "
                              f"engine.name={recipe.engine.name} cannot resume it. Resume with "
                              f"engine.name={meta['engine']}, or start a new run from its weights with "
                              f"--set model.init_from={ckpt}")
    if checkpoint_format == "deepspeed":
        if meta.get("zero_stage") != recipe.engine.zero_stage:
            raise CheckpointError(f"{ckpt} was written by ZeRO-{meta.get('zero_stage')}; this run is ZeRO-"
                                  f"{recipe.engine.zero_stage} (engine.zero_stage): DeepSpeed resumes only on the "
                                  "same stage")
        if int(meta["world_size"]) != world_size:
            raise CheckpointError(f"{ckpt} was written by {meta['world_size']} ranks; DeepSpeed resumes only on "
                                  f"{meta['world_size']} ranks (this job has {world_size}). Convert it with "
                                  "DeepSpeed's ds_to_universal, or resume on the same world size")
    architecture, regularisation = model_changes(meta["model"], model_shape(recipe.model))
    if architecture:
        raise CheckpointError(f"{ckpt} holds another model: {'; '.join(architecture)}. Resume with the checkpoint's "
                              f"model settings, or start a new run (checkpoint.resume=never or another checkpoint.dir)")
    warnings = [f"{change} (in {ckpt.name} -> now)" for change in regularisation]
    if int(meta["max_steps"]) != recipe.train.max_steps:
        warnings.append(f"train.max_steps changed from {meta['max_steps']} (in {ckpt.name}) to "
                        f"{recipe.train.max_steps}: the LR and EMA schedules are re-planned over the new length "
                        f"from step {meta['step']} on")
    return warnings


def _meta(recipe: Recipe, *, step: int, engine: str, checkpoint_format: str, world_size: int, **extra) -> dict:
    """What made a checkpoint (meta.json; the layout adds the format version and the file sizes)."""
    return {"step": step, "engine": engine, "checkpoint_format": checkpoint_format,
            "zero_stage": recipe.engine.zero_stage if engine == "deepspeed" else None, "world_size": world_size,
            "precision": recipe.train.precision, "max_steps": recipe.train.max_steps, "model": model_shape(recipe.model),
            "versions": _versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra}


def save_weights(out: str | Path, recipe: Recipe, student: dict, teacher: dict, *, source: str) -> Path:
    """A weights-only checkpoint at ``out`` (a step directory of its own): ``student``
    (``Data2Vec.state_dict()``) and ``teacher`` (``EMATeacher.state_dict()``) in the full format, the
    recipe and the meta. Resume refuses it; ``model.init_from`` starts from it."""
    from safetensors.torch import save_file

    from scaling.checkpoint.formats import FullFormat

    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: exists already (choose a new directory)")
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"student.{k}": v for k, v in student.items()} | {f"teacher.{k}": v for k, v in teacher.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / FullFormat.MODEL)
    (tmp / layout.RECIPE).write_text(to_yaml(recipe))
    layout.write_meta(tmp, _meta(recipe, step=0, engine="single", checkpoint_format="full", world_size=1,
                                 weights_only=True, source=source))
    (tmp / layout.COMPLETE).touch()
    tmp.rename(out)
    return out


class Checkpointer:
    """Save and load a run's checkpoints (every rank calls every method).

    With ``checkpoint.async_save`` (fsdp), a save stages the sharded state to host memory and returns
    while a background thread writes it; the checkpoint is completed (meta.json, COMPLETE, rename,
    pruning) by :meth:`wait`, which the next save and the end of the run call. Until then it is a
    ``.tmp_step_*`` directory that no resume picks."""

    def __init__(self, cfg: CheckpointConfig, engine, recipe: Recipe):
        self.cfg = cfg
        self.engine = engine
        self.recipe = recipe
        self.directory = Path(cfg.dir)
        self.format = FORMATS[engine.checkpoint_format]
        self._pending = None  # (future, tmp, final, step) of an asynchronous save in flight
        self._side_group = None  # the async writer's own process group (its collectives run beside training's)

    # ------------------------------------------------------------------ save
    def _check_finite(self, step: int) -> None:
        """Every rank checks its own pieces; all refuse together if any rank found a non-finite value."""
        bad = [clean_name(n) for n, t in self.engine.named_local_tensors() if not bool(torch.isfinite(t).all())]
        total = int(self.engine.all_reduce_sum(torch.tensor([float(len(bad))], device=self.engine.device)).item())
        if total:
            where = f"{bad[0]}" + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "") if bad else \
                "a tensor of another rank"
            latest = layout.find_latest(self.directory)
            raise NonFiniteStateError(
                f"step {step}: checkpoint not written: NaN or inf in {where} (the run diverged; lower optim.lr or "
                f"set optim.grad_clip). Previous checkpoints are kept" + (f", the newest is {latest}" if latest else ""))

    def save(self, step: int, train_state: dict) -> Path:
        """Write (or, asynchronously, start writing) the checkpoint of ``step``; returns its directory."""
        self.wait()  # one save in flight at most, and a refusal below keeps the previous one complete
        self._check_finite(step)
        engine = self.engine
        final, tmp = layout.step_dir(self.directory, step), layout.tmp_dir(self.directory, step)
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        if self.cfg.async_save:  # fsdp only (recipe validation)
            if self._side_group is None:
                import torch.distributed as dist

                self._side_group = dist.new_group(backend="gloo")
            future = self.format.save(engine, tmp, async_group=self._side_group)
        else:
            future = self.format.save(engine, tmp)
        # Per-rank state (RNG streams differ per rank); step and data position are the same everywhere.
        torch.save({**train_state, "rng": rng_state()}, layout.train_state_file(tmp, engine.rank))
        self._pending = (future, tmp, final, step)
        if future is None:
            self.wait()
        return final

    def wait(self) -> None:
        """Complete the save in flight, if any: every rank's files written, then meta.json (with their
        sizes), COMPLETE and the rename, then pruning."""
        if self._pending is None:
            return
        future, tmp, final, step = self._pending
        self._pending = None
        if future is not None:
            future.result()
        engine = self.engine
        engine.barrier()
        if engine.rank == 0:
            (tmp / layout.RECIPE).write_text(to_yaml(self.recipe))
            layout.write_meta(tmp, _meta(self.recipe, step=step, engine=self.recipe.engine.name,
                                         checkpoint_format=engine.checkpoint_format, world_size=engine.world_size))
            (tmp / layout.COMPLETE).touch()
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        engine.barrier()

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for old in layout.complete_checkpoints(self.directory)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path) -> dict:
        """Engine state, and the train state: ``step``, ``mlflow_run_id``, ``data_states`` (this
        rank's loader state; every old rank's when the world size changed) and ``same_world``."""
        meta = layout.check_intact(path)  # check_resume verified its files before the engine was built
        assert meta["checkpoint_format"] == self.engine.checkpoint_format, "check_resume runs before the engine"
        old_world, world = int(meta["world_size"]), self.engine.world_size
        self.format.load(self.engine, path)
        if old_world == world:
            state = load_torch(layout.train_state_file(path, self.engine.rank))
            set_rng_state(state.pop("rng"))
            state["data_states"] = [state.pop("data")]
        else:
            # Per-rank RNG streams do not map onto another world size; the caller re-seeds them.
            states = self._train_states(path, old_world)
            state = {k: v for k, v in states[0].items() if k not in ("rng", "data")}
            state["data_states"] = [s["data"] for s in states]
        state["same_world"] = old_world == world
        return state

    def data_states(self, path: Path) -> list[dict]:
        """Every rank's loader state (a loader resuming with another worker count needs them all)."""
        return [s["data"] for s in self._train_states(path, int(layout.read_meta(path)["world_size"]))]

    @staticmethod
    def _train_states(path: Path, world: int) -> list[dict]:
        return [load_torch(layout.train_state_file(path, r)) for r in range(world)]
