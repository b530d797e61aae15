"""Where a checkpoint's files are, what its ``meta.json`` says, and which checkpoint is the newest good one.

A run's ``checkpoint.dir`` holds one directory per saved step::

    step_00000020/
        <engine files>      see scaling/checkpoint/formats.py (full, dcp or deepspeed)
        train_state_rank{r}.pt   per rank: step, RNG states, data-loader position, MLflow run id
        recipe.yaml         the resolved recipe that produced it
        meta.json           what made it (format, engine, world size, model, versions) and the size of
                            every other file
        COMPLETE            written last: a directory without it is ignored

Only this module knows these names. A directory is written as ``.tmp_step_XXXXXXXX`` and renamed when
complete, so a crash mid-save never leaves a directory that resume would pick. A checkpoint whose
``meta.json`` does not parse, or whose files do not have the sizes it records (a copy cut short, a
disk that filled up), is *damaged*: named in a warning and passed over for the previous one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from scaling.checkpoint.safe import CheckpointError

log = logging.getLogger("scaling.checkpoint")

FORMAT_VERSION = 2
COMPLETE = "COMPLETE"
META = "meta.json"
RECIPE = "recipe.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def tmp_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f".tmp_step_{step:08d}"


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
                              "move them, or start anew with checkpoint.resume=never")
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
