"""Checkpoints: atomic, self-describing, auto-resumed.

Layout of ``checkpoint.dir``::

    step_00000020/
        model.safetensors | engine-specific files   (student, teacher, optimizer, scheduler, scaler)
        train_state.pt     step, RNG states, data-loader position, MLflow run id
        recipe.yaml        the resolved recipe that produced it
        meta.json          format version, step, engine, world size
        COMPLETE           written last: a directory without it is ignored

A checkpoint is written under a temporary name and renamed when complete, so
a crash mid-save never leaves a directory that resume would pick. Everything
is loaded with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from scaling.config import CheckpointConfig
from scaling.engines import Engine

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def find_latest(directory: Path) -> Path | None:
    """Newest complete checkpoint in ``directory`` (a run's ``checkpoint.dir``), or None."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists()]
    return max(done, key=lambda p: p.name, default=None)


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


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, engine: Engine, recipe_yaml: str):
        self.cfg = cfg
        self.engine = engine
        self.recipe_yaml = recipe_yaml
        self.directory = Path(cfg.dir)

    def resume_path(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return find_latest(self.directory)
        path = Path(self.cfg.resume)
        if (path / "COMPLETE").exists():
            return path
        latest = find_latest(path)
        if latest is None:
            raise ValueError(f"checkpoint.resume: {path} is neither a complete checkpoint nor a directory holding one")
        return latest

    def save(self, step: int, train_state: dict) -> Path:
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp_step_{step:08d}"
        if self.engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        self.engine.save(tmp)
        # Per-rank state (RNG streams differ per rank); step and data position are the same everywhere.
        torch.save({**train_state, "rng": rng_state()}, tmp / f"train_state_rank{self.engine.rank}.pt")
        self.engine.barrier()
        if self.engine.rank == 0:
            (tmp / "recipe.yaml").write_text(self.recipe_yaml)
            meta = {"format": FORMAT_VERSION, "step": step, "world_size": self.engine.world_size,
                    "engine": type(self.engine).__name__}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            (tmp / "COMPLETE").touch()
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        self.engine.barrier()
        return final

    def load(self, path: Path) -> dict:
        """Engine state, and the train state: ``step``, ``mlflow_run_id``, ``data_states`` (this
        rank's loader state; every old rank's when the world size changed) and ``same_world``."""
        meta = json.loads((path / "meta.json").read_text())
        if meta["format"] != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format {meta['format']}, this code reads {FORMAT_VERSION}")
        old_world, world = int(meta["world_size"]), self.engine.world_size
        if old_world != world and not self.engine.loads_other_world_size:
            raise ValueError(f"{path} was written by {old_world} ranks; {type(self.engine).__name__} resumes only on "
                             f"{old_world} ranks (this job has {world}). Convert it with DeepSpeed's ds_to_universal, "
                             "or resume on the same world size")
        self.engine.load(path)
        files = [path / f"train_state_rank{r}.pt" for r in range(old_world)]
        for f in files:
            if not f.exists():
                raise ValueError(f"{path}: no {f.name}; it was written by {old_world} rank(s)")
        if old_world == world:
            state = torch.load(files[self.engine.rank], weights_only=True)
            set_rng_state(state.pop("rng"))
            state["data_states"] = [state.pop("data")]
        else:
            # Per-rank RNG streams do not map onto another world size; the caller re-seeds them.
            states = [torch.load(f, weights_only=True) for f in files]
            state = {k: v for k, v in states[0].items() if k not in ("rng", "data")}
            state["data_states"] = [s["data"] for s in states]
        state["same_world"] = old_world == world
        return state

    def data_states(self, path: Path) -> list[dict]:
        """Every rank's loader state (a loader resuming with another worker count needs them all)."""
        meta = json.loads((path / "meta.json").read_text())
        return [torch.load(path / f"train_state_rank{r}.pt", weights_only=True)["data"]
                for r in range(int(meta["world_size"]))]

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        done = sorted(p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").exists())
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
