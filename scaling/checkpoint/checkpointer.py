"""Saving and resuming a run: atomic step directories, what made them, and what may resume from them.

Every rank calls :meth:`Checkpointer.save` and :meth:`Checkpointer.load`; the engine's files are
written and read by its format (scaling/checkpoint/formats.py). Before anything is built,
:func:`check_resume` compares a checkpoint's ``meta.json`` and ``recipe.yaml`` with the run about to
resume from it: what cannot change mid-run is refused, what can is applied (the optimizer's LR and
hyper-parameters, which the restored optimizer and scheduler state would otherwise silently keep),
so the next checkpoint's ``recipe.yaml`` says what ran.

A :class:`Checkpointer` owns its ``checkpoint.dir`` for the job's life (scaling/checkpoint/lock.py)
and removes what failed saves left there. A save that cannot be written (disk full, read-only,
quota) fails on every rank together with one line naming the folder, the bytes it needs and the
bytes free; it leaves no temporary folder, and the previous checkpoint stays the newest.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import math
import random
import shutil
from pathlib import Path

import torch

from scaling.checkpoint import layout
from scaling.checkpoint.formats import FORMATS, clean_name, verify
from scaling.checkpoint.lock import FolderLock
from scaling.checkpoint.safe import CheckpointError, load_torch
from scaling.config import CheckpointConfig, ModelConfig, OptimConfig, Recipe, flatten, load_recipe, to_yaml

log = logging.getLogger("scaling.checkpoint")


class NonFiniteStateError(RuntimeError):
    """A save was refused because the student or the teacher holds NaN or inf; older checkpoints are kept."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no space, read-only, quota); nothing of it is left, older
    checkpoints are kept. The message is one line naming the folder, the bytes needed and free."""


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
        existing = layout.complete_checkpoints(Path(cfg.dir))
        if existing:  # a new run's checkpoints among an old run's: resume would later pick either
            raise CheckpointError(f"{cfg.dir}: checkpoint.resume=never, but this checkpoint.dir holds checkpoints of "
                                  f"an earlier run (newest: {existing[-1]}). Start the new run in another "
                                  "checkpoint.dir, resume this one (checkpoint.resume=auto), or move them away")
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


# Recipe values a resumed run cannot change: they decide which samples, crops and masks the run sees
# (the data position and the RNG streams restored from the checkpoint assume them). The model's
# architecture is compared on meta.json's own record (model_changes).
FIXED = ("seed", "masking.", "data.train_shards", "data.speech.", "data.vision.", "data.text.")
# Restored with the optimizer and scheduler state, and set to the new recipe's value by Checkpointer.load.
OPTIMIZER_APPLIED = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay")


def stored_recipe(ckpt: Path) -> Recipe | None:
    """The resolved recipe a checkpoint was written with (None for one without ``recipe.yaml``)."""
    path = Path(ckpt) / layout.RECIPE
    return load_recipe(path, require_data=False) if path.is_file() else None


def recipe_changes(old: Recipe, new: Recipe) -> tuple[list[str], list[str]]:
    """Between a checkpoint's recipe and a resuming run's: (changes a resume must refuse, changes of
    the optimizer's values and of the LR schedule that it applies), each ``key old -> new``."""
    a, b = flatten(old), flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    line = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed]
    # A weight decay from 0: every group holds 0 then, and the decay groups cannot be told apart.
    unknown_groups = {"optim.weight_decay"} if old.optim.weight_decay == 0 else set()
    fixed = [text for k, text in zip(changed, line)
             if k in FIXED or k in unknown_groups or k.startswith(tuple(f for f in FIXED if f[-1] == "."))]
    applied = [text for k, text in zip(changed, line)
               if (k in OPTIMIZER_APPLIED and k not in unknown_groups) or k.startswith("schedule.")]
    return fixed, applied


def check_resume(ckpt: Path, recipe: Recipe, *, world_size: int, checkpoint_format: str) -> list[str]:
    """Whether a run of ``recipe`` on ``world_size`` ranks, whose engine writes ``checkpoint_format``,
    can resume from ``ckpt``. Raises CheckpointError (one line) for what cannot resume: another engine
    format, another model architecture, other :data:`FIXED` values (seed, masking, data), a weights-only
    checkpoint, DeepSpeed on another ZeRO stage or world size. Returns warnings for what resumes but
    changes the run (``train.max_steps``, dropouts, the LR, optimizer and schedule values)."""
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
                              f"model settings, or start a new run in another checkpoint.dir")
    warnings = [f"{change} (in {ckpt.name} -> now)" for change in regularisation]
    stored = stored_recipe(ckpt)
    if stored is not None:
        fixed, applied = recipe_changes(stored, recipe)
        if fixed:
            raise CheckpointError(f"{ckpt} was written with other values of settings that cannot change mid-run: "
                                  f"{'; '.join(fixed)}. Resume with the checkpoint's values, or start a new run in "
                                  "another checkpoint.dir")
        warnings += [f"{change} (in {ckpt.name} -> now): applied from step {meta['step']} on" for change in applied]
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
    layout.publish(tmp, out)
    return out


class Checkpointer:
    """Save and load a run's checkpoints (every rank calls every method).

    Constructing one takes the ``checkpoint.dir`` for this job (rank 0 holds its lock until
    :meth:`close`; a folder another live job holds is refused on every rank) and removes what failed
    saves left there. With ``checkpoint.async_save`` (fsdp), a save stages the sharded state to host
    memory and returns while a background thread writes it; the checkpoint is completed (meta.json,
    COMPLETE, rename, pruning) by :meth:`wait`, which the next save and the end of the run call. Until
    then it is a ``.tmp_step_*`` directory that no resume picks."""

    def __init__(self, cfg: CheckpointConfig, engine, recipe: Recipe):
        self.cfg = cfg
        self.engine = engine
        self.recipe = recipe
        self.directory = Path(cfg.dir)
        self.format = FORMATS[engine.checkpoint_format]
        self._pending = None  # (future, tmp, final, step, failure) of a save in flight
        self._side_group = None  # the async writer's own process group (its collectives run beside training's)
        self._lock = None
        refusal = None
        if engine.rank == 0:
            try:
                self._lock = FolderLock.acquire(self.directory)
            except CheckpointError as exn:
                refusal = exn
            else:
                for line in layout.remove_leftovers(self.directory):
                    log.warning("%s: %s", self.directory, line)
        if self._any(refusal is not None):  # every rank stops, none waits in a collective for rank 0
            raise refusal or CheckpointError(f"{self.directory}: checkpoint.dir is in use by another live job "
                                             "(rank 0 names it)")

    def close(self) -> None:
        """Let go of the ``checkpoint.dir`` (the end of the job, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _any(self, flag: bool) -> int:
        """How many ranks pass ``flag``; a collective, so also the point where every rank agrees."""
        return int(self.engine.all_reduce_sum(torch.tensor([float(flag)], device=self.engine.device)).item())

    # ------------------------------------------------------------------ save
    def _check_finite(self, step: int) -> None:
        """Every rank checks its own pieces; all refuse together if any rank found a non-finite value."""
        bad = [clean_name(n) for n, t in self.engine.named_local_tensors() if not bool(torch.isfinite(t).all())]
        total = self._any(bool(bad))
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

        def make_tmp():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        self._fail_together(step, tmp, _attempt(make_tmp) if engine.rank == 0 else None)
        future = None

        def write():
            nonlocal future
            if self.cfg.async_save:  # fsdp only (recipe validation)
                if self._side_group is None:
                    import torch.distributed as dist

                    self._side_group = dist.new_group(backend="gloo")
                future = self.format.save(engine, tmp, async_group=self._side_group)
            else:
                self.format.save(engine, tmp)
            # Per-rank state (RNG streams differ per rank); step and data position are the same everywhere.
            torch.save({**train_state, "rng": rng_state()}, layout.train_state_file(tmp, engine.rank))

        failure = _attempt(write)
        self._pending = (future, tmp, final, step, failure)
        if future is None or failure is not None:
            self.wait()
        return final

    def wait(self) -> None:
        """Complete the save in flight, if any: every rank's files written, then meta.json (with their
        sizes), COMPLETE, fsync and the rename, then pruning (only once the new checkpoint is complete)."""
        if self._pending is None:
            return
        future, tmp, final, step, failure = self._pending
        self._pending = None
        if future is not None:  # waited for even after a failure here: it writes into tmp
            written = _attempt(future.result)
            failure = failure or written
        self._fail_together(step, tmp, failure)
        engine = self.engine

        def complete():
            (tmp / layout.RECIPE).write_text(to_yaml(self.recipe))
            layout.write_meta(tmp, _meta(self.recipe, step=step, engine=self.recipe.engine.name,
                                         checkpoint_format=engine.checkpoint_format, world_size=engine.world_size))
            (tmp / layout.COMPLETE).touch()
            layout.publish(tmp, final)

        self._fail_together(step, tmp, _attempt(complete) if engine.rank == 0 else None)
        if engine.rank == 0:
            self._prune()
        engine.barrier()

    def _fail_together(self, step: int, tmp: Path, failure: BaseException | None) -> None:
        """If a write failed on any rank: the temporary folder is removed and every rank raises (one
        line, CheckpointWriteError, for what the folder or the disk refused)."""
        failed = self._any(failure is not None)
        if not failed:
            return
        if self.engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = layout.find_latest(self.directory)
        need = self._state_bytes(latest)  # collective: every rank is here
        kept = f"Previous checkpoints are kept, the newest is {latest}" if latest else "No earlier checkpoint exists"
        if failure is None:
            raise CheckpointWriteError(f"step {step}: checkpoint not written to {self.directory}: the write failed on "
                                       f"{failed} other rank(s) (their log says why). {kept}")
        where = _existing(self.directory)
        free = shutil.disk_usage(where).free
        reason = _disk_reason(failure)
        if reason is None and free < need:  # torch's writer hides ENOSPC in a RuntimeError ("unexpected pos ...")
            reason = f"no space left on device ({_first_line(failure)})"
        if reason is None:
            log.error("step %d: checkpoint not written to %s (%d rank(s) failed)", step, self.directory, failed)
            raise failure
        message = (f"step {step}: checkpoint not written to {self.directory}: {reason}; it needs about "
                   f"{_mib(need)} MiB, {_mib(free)} MiB free there. {kept}")
        if self.engine.rank != 0:  # rank 0's error is the job's one line (scaling.pretrain.main)
            log.error("rank %d: %s", self.engine.rank, message)
        raise CheckpointWriteError(message) from None

    def _state_bytes(self, previous: Path | None) -> int:
        """What a checkpoint of this run needs on disk: the previous one's size when there is one (rank
        0), else an estimate from the state (student with two AdamW moments, and the teacher)."""
        local = sum(t.numel() * t.element_size() * (3 if n.startswith("student.") else 1)
                    for n, t in self.engine.named_local_tensors())
        estimate = int(self.engine.all_reduce_sum(torch.tensor([float(local)], device=self.engine.device)).item())
        return layout.total_bytes(previous) if previous is not None else estimate

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
        stored = stored_recipe(path)
        if stored is not None:
            self._apply_optimizer_changes(stored.optim, self.recipe.optim)
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

    def _apply_optimizer_changes(self, old: OptimConfig, new: OptimConfig) -> None:
        """The new recipe's :data:`OPTIMIZER_APPLIED` values over the ones the optimizer and scheduler
        state brought back (check_resume warned about each). The LR: the scheduler's base LRs are the
        new peak, and every group's current LR is the schedule's value at this step, which the next
        optimizer step uses (the scheduler only updates it after a step)."""
        scheduler = self.engine.scheduler  # every engine's torch LambdaLR (DeepSpeed holds the same one)
        groups = scheduler.optimizer.param_groups
        if new.lr != old.lr:
            assert all(math.isclose(b, old.lr, rel_tol=1e-9) for b in scheduler.base_lrs), (scheduler.base_lrs, old.lr)
            scheduler.base_lrs = [new.lr for _ in groups]  # every group peaks at optim.lr (scaling.optim)
            for group, factor in zip(groups, scheduler.lr_lambdas):
                group["initial_lr"] = new.lr
                group["lr"] = new.lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
        for group in groups:
            group["betas"] = tuple(new.betas)
            group["eps"] = new.eps
            # The no-decay groups (1-D parameters) keep 0; the decay groups carry optim.weight_decay.
            if group["weight_decay"] == old.weight_decay and old.weight_decay != 0:
                group["weight_decay"] = new.weight_decay

    def data_states(self, path: Path) -> list[dict]:
        """Every rank's loader state (a loader resuming with another worker count needs them all)."""
        return [s["data"] for s in self._train_states(path, int(layout.read_meta(path)["world_size"]))]

    @staticmethod
    def _train_states(path: Path, world: int) -> list[dict]:
        return [load_torch(layout.train_state_file(path, r)) for r in range(world)]


def _attempt(write) -> BaseException | None:
    """Run one write; its exception, if any, for the ranks to agree on (a rank that raised alone would
    leave the others waiting in the next collective)."""
    try:
        write()
    except Exception as exn:  # noqa: BLE001  (OSError, torch's RuntimeError, SafetensorError, DCP's wrapper)
        return exn
    return None


# What the folder or the disk refused, by errno.
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def _disk_reason(exn: BaseException) -> str | None:
    """The reason of :data:`_DISK_ERRORS` anywhere in ``exn``'s causes (DCP wraps each rank's failure)."""
    seen, todo = set(), [exn]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            return f"{_DISK_ERRORS[e.errno]} ({errno.errorcode[e.errno]}{': ' + str(e.filename) if e.filename else ''})"
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _first_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0]}" if text else type(exn).__name__


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where free space is measured)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"
