"""Checkpoints: atomic, self-describing, auto-resumed, and readable by tools without a process group.

- ``layout``: step directories, ``COMPLETE``, ``meta.json`` (what made a checkpoint, the size of
  every file), the newest intact checkpoint, damaged ones passed over with a warning.
- ``formats``: each engine's files (full for single/ddp, DCP for fsdp, DeepSpeed's own plus the
  teacher partitions), written on save, read on resume, and read offline one tensor at a time.
- ``safe``: nothing read from a checkpoint may run code (restricted unpickling everywhere).
- ``checkpointer``: the save/resume logic the training loop uses, and the resume compatibility check.
- ``lock``: one job per ``checkpoint.dir`` (a lock held by rank 0 for the job's life, naming its owner).
- ``consolidate``: one streamed safetensors file of the student and/or teacher.

Tools read checkpoints only through :func:`open_parts` / :func:`open_part` / :func:`read_state_dict` /
:func:`read_recipe` here: a ``checkpoint`` argument is a checkpoint directory or a run's
``checkpoint.dir`` (its newest intact checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaling.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointWriteError,
    NonFiniteStateError,
    check_resume,
    model_changes,
    model_shape,
    resume_path,
    save_weights,
)
from scaling.checkpoint.formats import FORMATS, PARTS, TensorInfo, TensorSource, verify
from scaling.checkpoint.layout import (FORMAT_VERSION, RECIPE, check_intact, checkpoint_step, find_latest, read_meta,
                                      resolve)
from scaling.checkpoint.safe import CheckpointError


def open_parts(checkpoint: str | Path, parts=PARTS) -> tuple[Path, dict, dict[str, TensorSource]]:
    """(the resolved checkpoint directory, its meta, a source of each part's tensors), its files
    verified once. A part: ``student`` (keys of ``Data2Vec.state_dict()``) or ``teacher``
    (``encoder.*``, the EMA teacher)."""
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    ckpt = resolve(checkpoint)
    meta = check_intact(ckpt)
    verify(ckpt, meta)
    fmt = FORMATS[meta["checkpoint_format"]]
    return ckpt, meta, {part: fmt.source(ckpt, part, meta) for part in parts}


def open_part(checkpoint: str | Path, part: str = "student") -> tuple[Path, dict, TensorSource]:
    """:func:`open_parts` of one part."""
    ckpt, meta, sources = open_parts(checkpoint, [part])
    return ckpt, meta, sources[part]


def read_state_dict(checkpoint: str | Path, part: str = "student") -> dict[str, torch.Tensor]:
    """Every tensor of ``part`` (fp32 as trained), from any engine's checkpoint, in this process."""
    _, _, source = open_part(checkpoint, part)
    return source.read(list(source.infos))


def read_recipe(checkpoint: str | Path):
    """The resolved recipe stored with a checkpoint."""
    from scaling.config import load_recipe

    ckpt = resolve(checkpoint)
    if not (ckpt / RECIPE).is_file():
        raise CheckpointError(f"{ckpt / RECIPE}: missing")
    return load_recipe(ckpt / RECIPE)


__all__ = [
    "CheckpointError", "CheckpointWriteError", "Checkpointer", "NonFiniteStateError", "FORMAT_VERSION", "TensorInfo", "TensorSource",
    "check_resume", "check_intact", "checkpoint_step", "find_latest", "model_changes", "model_shape", "open_part", "open_parts",
    "read_meta", "read_recipe", "read_state_dict", "resolve", "resume_path", "save_weights",
]
