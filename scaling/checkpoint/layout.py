"""Where a checkpoint's files are, what its ``meta.json`` says, and which checkpoint is the newest good one.

A run's ``checkpoint.dir`` holds one directory per saved step::

    step_00000020/
        <engine files>      see scaling/checkpoint/formats.py (full, dcp or deepspeed)
        train_state_rank{r}.pt   per rank: step, RNG states, data-loader position, MLflow run id
        recipe.yaml         the resolved recipe that produced it
        meta.json           what made it (format, engine, world size, model, versions) and the size of
                            every other file
        COMPLETE            written last: a directory without it is ignored

Beside them: ``run.json`` (scaling/tracking.py) and, while a job runs, ``.lock`` (scaling/checkpoint/lock.py).

Only this module knows these names. A directory is written as ``.tmp_step_XXXXXXXX`` and renamed when
complete (:func:`publish`: its files and folders are fsynced before the rename and the parent after,
so a machine crash cannot publish a torn checkpoint), so a crash mid-save never leaves a directory
that resume would pick; the next job on the folder removes it (:func:`remove_leftovers`). A checkpoint whose
``meta.json`` does not parse, or whose files do not have the sizes it records (a copy cut short, a
disk that filled up), is *damaged*: named in a warning and passed over for the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from scaling.checkpoint.safe import CheckpointError

log = logging.getLogger("scaling.checkpoint")

FORMAT_VERSION = 2
COMPLETE = "COMPLETE"
META = "meta.json"
RECIPE = "recipe.yaml"
LOCK = ".lock"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.tmp_step_(\d{8})$")
_OLD_DIR = re.compile(r"^\.old_step_(\d{8})$")


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def tmp_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f".tmp_step_{step:08d}"


def _old_dir(final: Path) -> Path:
    """Where :func:`publish` moves a checkpoint it replaces until the new one is in place."""
    return final.with_name(f".old_{final.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders after what they hold), and ``root``."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(here) / name)
        _fsync(Path(here))


def publish(tmp: Path, final: Path) -> None:
    """Make the finished ``tmp`` the checkpoint ``final``: durable before it is visible, and the
    rename itself durable after. A checkpoint of the same step already there is replaced."""
    sync_tree(tmp)
    old = _old_dir(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(directory: Path) -> list[str]:
    """Remove what saves that did not complete left in a ``checkpoint.dir`` (only its owner may: call
    with the folder's lock held): ``.tmp_step_*`` folders, and a checkpoint that :func:`publish` moved
    aside is put back when its replacement never arrived. Returns what was done, one line each."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for p in sorted(directory.iterdir()):
        if _TMP_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}, left by a save that did not complete")
        elif _OLD_DIR.match(p.name):
            final = p.with_name(p.name[len(".old_"):])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p}, replaced by {final.name}")
            else:
                p.rename(final)
                done.append(f"restored {final} from {p.name} (its replacement was never completed)")
    return done


def train_state_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"train_state_rank{rank}.pt"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete step directories of a ``checkpoint.dir``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _STEP_DIR.match(p.name) and is_complete(p))


def manifest(ckpt: Path) -> dict[str, int]:
    """Size of every file under ``ckpt`` but meta.json and COMPLETE, by path relative to it."""
    ckpt = Path(ckpt)
    return {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name not in (META, COMPLETE)}


def total_bytes(ckpt: Path) -> int:
    """What a checkpoint occupies on disk (its files)."""
    return sum(p.stat().st_size for p in Path(ckpt).rglob("*") if p.is_file())


def write_meta(ckpt: Path, meta: dict) -> None:
    """``meta`` plus the manifest of the files already in ``ckpt`` (call after every rank has written)."""
    (Path(ckpt) / META).write_text(json.dumps({**meta, "format": FORMAT_VERSION, "files": manifest(ckpt)}, indent=1))


def read_meta(ckpt: Path) -> dict:
    """The checkpoint's ``meta.json``; CheckpointError naming the file when it is missing, cut or from
    another format version."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a checkpoint written by scaling?)") from None
    except (ValueError, UnicodeDecodeError) as exn:
        raise CheckpointError(f"{path}: damaged, not valid JSON ({exn})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{path}: checkpoint format {got!r}; this code reads format {FORMAT_VERSION}")
    return meta


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was written after."""
    return int(read_meta(ckpt)["step"])


def check_intact(ckpt: Path) -> dict:
    """``meta.json``, after checking that every file it lists exists with the recorded size."""
    meta = read_meta(ckpt)
    for rel, size in meta.get("files", {}).items():
        path = Path(ckpt) / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {META})")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: damaged, {path.stat().st_size} bytes where {META} records {size}")
    return meta


def find_latest(directory: Path) -> Path | None:
    """Newest complete and intact checkpoint in a ``checkpoint.dir``, or None when it holds no complete
    checkpoint. Damaged ones are named in a warning and skipped, so the previous good checkpoint is
    used; when every complete checkpoint is damaged, CheckpointError (a run must not silently start
    over beside them)."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(directory)):
        try:
            check_intact(ckpt)
        except CheckpointError as exn:
            log.warning("skipping damaged checkpoint %s: %s", ckpt.name, exn)
            damaged.append(exn)
            continue
        return ckpt
    if damaged:
        raise CheckpointError(f"{directory}: every complete checkpoint is damaged (newest: {damaged[0]}); repair or "
                              "move them, or start anew in another checkpoint.dir")
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory given directly (it must be intact), or the newest intact checkpoint of a
    ``checkpoint.dir``. CheckpointError naming the path otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or checkpoint.dir")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint or a checkpoint.dir)")
    if is_complete(path):
        check_intact(path)
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path}: not a complete checkpoint, and it holds no complete checkpoint "
                              "(step_XXXXXXXX/ with a COMPLETE marker)")
    return latest
