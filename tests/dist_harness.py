"""Run ``scaling.pretrain.run`` on N gloo ranks inside a test (torch.multiprocessing.spawn)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(modality: str, overrides: list[str], stop_at_step: int | None = None) -> dict:
    """One rank's run of recipes/<modality>/tiny.yaml (``modality`` may name another recipe of the
    modality: ``vision/v2-tiny``); returns what the tests compare."""
    from scaling.config import load_recipe
    from scaling.pretrain import run

    path = REPO / "recipes" / (f"{modality}.yaml" if "/" in modality else f"{modality}/tiny.yaml")
    result = run(load_recipe(path, overrides), stop_at_step=stop_at_step, gather_state=True)
    return {"losses": [h.loss for h in result.history], "num_masked": [h.num_masked for h in result.history],
            "state": result.full_state, "memory": result.memory, "step": result.step}


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
                      MLFLOW_DISABLE_TELEMETRY="true", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # The result is on disk. Skip interpreter finalization: there, gloo's worker threads still holding
    # async work sometimes abort the process ("terminate called without an active exception"; see
    # pytorch/pytorch#179291), which fails the test after the run it checks has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world_size: int = 2) -> list:
    """Run ``fn(*args)`` on ``world_size`` ranks; returns each rank's return value."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_single(modality: str, overrides: list[str], stop_at_step: int | None = None) -> dict:
    """The same run in this process, one rank (the reference)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    return run_recipe(modality, overrides, stop_at_step)


def assert_same_run(ref: dict, ranks: list[dict], *, rtol=1e-4, teacher_atol=1e-5):
    for r in ranks:  # every rank saw the same global losses
        assert r["num_masked"] == ref["num_masked"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0)
    gathered = ranks[0]["state"]
    teacher_keys = [k for k in ref["state"] if k.startswith("teacher.")]
    assert teacher_keys and set(teacher_keys) <= set(gathered)
    for k in teacher_keys:
        torch.testing.assert_close(gathered[k], ref["state"][k], rtol=0, atol=teacher_atol, msg=k)


# ----------------------------------------------------------------------------- checkpoints of every engine
ENGINES = {  # name -> (modality, overrides): bf16 where DeepSpeed pickles its loss scaler objects
    "single": ("vision", ["engine.name=single", "train.precision=fp32"]),
    "fsdp": ("vision", ["engine.name=fsdp", "train.precision=fp32"]),
    "zero3": ("vision", ["engine.name=deepspeed", "engine.zero_stage=3", "train.precision=bf16"]),
    "zero2": ("text", ["engine.name=deepspeed", "engine.zero_stage=2", "train.precision=bf16"]),
    "zero1": ("text", ["engine.name=deepspeed", "engine.zero_stage=1", "train.precision=fp32"]),
}


def engine_overrides(tmp: Path, name: str) -> list[str]:
    return ENGINES[name][1] + ["train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4",
                               "tracking.enabled=false", "checkpoint.every_steps=100", "checkpoint.resume=never",
                               f"checkpoint.dir={tmp}/{name}"]


def run_jobs(jobs: list[tuple], ports: list[int]) -> list[dict]:
    """Several runs of ``(modality, overrides)``, one after the other in this rank; each later run
    joins a new process group on the next of ``ports``."""
    results = []
    for i, (modality, overrides) in enumerate(jobs):
        if i:
            os.environ["MASTER_PORT"] = str(ports[i - 1])
        results.append(run_recipe(modality, overrides))
    return results


sys.path.insert(0, str(REPO))
