"""A rank that hangs or dies, through the real torchrun (gloo, 2 ranks, CPU), and the warnings a run prints.

- Hung rank: rank 1 is SIGSTOPped mid-run with ``engine.timeout_s=20``. Rank 0's next collective
  times out, it prints one error line naming the timeout and rank 1, and the job exits non-zero
  within the timeout plus torchrun's fixed 30 s grace before it SIGKILLs the stopped rank (plus
  start-up); torchrun's summary names rank 1 (SIGKILL) and carries rank 0's line (``@record``).
- Killed rank: ``kill -9`` of rank 1 at a random step (fsdp, ZeRO-3); the job exits non-zero, the same
  command resumes, and every file of the final checkpoint (student, teacher, optimizer, scheduler,
  data and RNG state) holds exactly the values of the uninterrupted run's.
- Warnings: the uninterrupted 2-rank fsdp and ZeRO-3 runs print none of the warnings the engines
  filter, and the premises of the FSDP filter hold (a block's main output is no view; the student
  drops its taps).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TORCHRUN_GRACE_S = 30  # LocalElasticAgent._stop_workers: SIGTERM, then SIGKILL after 30 s (not configurable)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


_started: list[tuple[subprocess.Popen, set[int]]] = []  # agents and the workers seen, killed after each test


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    while _started:
        agent, workers = _started.pop()
        workers |= set(_workers(agent))
        for pid in [agent.pid, *workers]:  # torchrun starts its workers in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait()


def _torchrun(recipe: str, sets: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "scaling.pretrain",
           str(REPO / "recipes" / recipe), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, env=_env(), cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _started.append((proc, set()))
    return proc


def _workers(agent: subprocess.Popen) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the agent)."""
    children = _workers(agent)
    for entry in _started:
        if entry[0] is agent:
            entry[1].update(children)
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    # Generous: on a loaded 2-core machine torchrun's start-up alone has taken minutes.
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text()):
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    return proc.wait(timeout=timeout)  # a TimeoutExpired fails the test; the fixture kills what is left


def _sets(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1", "tracking.enabled=false",
            "data.vision.augment=false", f"checkpoint.dir={tmp}/{name}", *extra]


# ----------------------------------------------------------------------------- a hung rank
@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_timeout_and_is_named(tmp_path):
    timeout_s = 20
    log = tmp_path / "hung.log"
    proc = _torchrun("vision/tiny.yaml", _sets(tmp_path, "hung", "engine.name=fsdp", "train.precision=fp32",
                                               "train.max_steps=100000", "checkpoint.every_steps=100000",
                                               f"engine.timeout_s={timeout_s}"), log)
    _wait_for(log, r"step 3/", proc)
    os.kill(_rank_pid(proc, 1), signal.SIGSTOP)
    t0 = time.monotonic()
    rc = _finish(proc, timeout=timeout_s + TORCHRUN_GRACE_S + 120)
    took = time.monotonic() - t0
    out = log.read_text()
    assert rc != 0, out[-4000:]
    assert timeout_s - 1 <= took <= timeout_s + TORCHRUN_GRACE_S + 20, (took, out[-4000:])
    errors = [ln for ln in out.splitlines() if "scaling-pretrain: error:" in ln]
    assert len(errors) == 1, out[-4000:]  # one line, from the rank that waited; no traceback of its own
    assert re.search(rf"rank 0: a collective timed out after {timeout_s} s \(engine\.timeout_s\): rank 1 did not "
                     "answer", errors[0]), errors[0]
    assert not re.search(r"^\[rank\d\]: Traceback", out, re.M), out[-4000:]  # torch's prefix on a rank's traceback
    summary = out[out.index("Root Cause"):] if "Root Cause" in out else out[-3000:]
    assert "rank 1 did not answer" in summary, summary  # rank 0's line, from its @record error file
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", out), out[-3000:]


# ----------------------------------------------------------------------------- a killed rank
def _values(path: Path):
    """Everything a checkpoint file holds, as nested python values and tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _dcp_values(folder: Path, tmp: Path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"dcp-{abs(hash(str(folder)))}.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, map_location="cpu", weights_only=False)


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's pickled loss scaler
        assert type(a) is type(b), where
        _assert_equal(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


# Files of a checkpoint that record the job rather than the state: when and where it ran.
_RUN_RECORDS = {"meta.json", "recipe.yaml", "COMPLETE", "zero_to_fp32.py", "zero_to_torch.py"}


def _assert_same_checkpoint(a: Path, b: Path, tmp: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in _RUN_RECORDS)
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*")
                                     if p.is_file() and p.name not in _RUN_RECORDS)
    compared = 0
    if (a / "dcp").is_dir():
        _assert_equal(_dcp_values(a / "dcp", tmp), _dcp_values(b / "dcp", tmp), "dcp")
        compared += 1
    for rel in files:
        if rel.parts[0] == "dcp":
            continue
        _assert_equal(_values(a / rel), _values(b / rel), str(rel))
        compared += 1
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["engine.name=fsdp", "train.precision=fp32"],
                                    ["engine.name=deepspeed", "engine.zero_stage=3", "train.precision=bf16"]],
                         ids=["fsdp", "zero3"])
def test_kill_9_of_one_rank_then_the_same_command_resumes_bit_equal(tmp_path, engine):
    steps, every = 8, 2
    kill_at = random.Random().randint(3, steps - 2)  # a random step; printed by the assertion messages below
    full = _sets(tmp_path, "full", *engine, f"train.max_steps={steps}", f"checkpoint.every_steps={every}")
    proc = _torchrun("vision/tiny.yaml", full, tmp_path / "full.log")
    assert _finish(proc, 900) == 0, (tmp_path / "full.log").read_text()[-4000:]
    _assert_no_filtered_warnings((tmp_path / "full.log").read_text())

    sets = _sets(tmp_path, "killed", *engine, f"train.max_steps={steps}", f"checkpoint.every_steps={every}")
    log = tmp_path / "killed.log"
    proc = _torchrun("vision/tiny.yaml", sets, log)
    _wait_for(log, rf"step {kill_at}/{steps}", proc)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    t0 = time.monotonic()
    rc = _finish(proc, 120)
    out = log.read_text()
    assert rc != 0 and time.monotonic() - t0 < 60, (kill_at, rc, out[-4000:])
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", out), out[-3000:]
    complete = [int(p.name[len("step_"):]) for p in (tmp_path / "killed").glob("step_*") if (p / "COMPLETE").exists()]
    assert complete and max(complete) < steps and kill_at - every <= max(complete) <= kill_at, (kill_at, complete)

    log = tmp_path / "resumed.log"
    proc = _torchrun("vision/tiny.yaml", sets, log)
    assert _finish(proc, 900) == 0, log.read_text()[-4000:]
    resumed = re.search(r"resumed from \S+step_0+(\d+) at step (\d+)", log.read_text())
    assert resumed, log.read_text()[-3000:]
    assert int(resumed.group(1)) == int(resumed.group(2)) == max(complete), (kill_at, complete, resumed.group(0))
    final = f"step_{steps:08d}"
    assert _assert_same_checkpoint(tmp_path / "full" / final, tmp_path / "killed" / final, tmp_path) >= 3


# ----------------------------------------------------------------------------- warnings
def _assert_no_filtered_warnings(out: str) -> None:
    """None of the warnings the engines filter (docs/performance.md "Warnings"), nor any other
    Python warning, in a run's output (both ranks' stderr and stdout)."""
    for text in ("returned a view tensor", "is deprecated. Please use `torch.distributed",
                 "A module has unknown inputs or outputs type"):
        assert text not in out, (text, out[-4000:])
    assert not [ln for ln in out.splitlines() if re.search(r"\w+Warning: ", ln)], out[-4000:]
    assert "step 8: loss" in out  # the run's own output is there (a positive control)


@pytest.mark.parametrize("block", ["post", "pre"])
def test_the_premises_of_the_fsdp_view_filter(block):
    """A block's main output is no view (FSDP's warning can only be about the tap), its "ffn" tap is
    one (what FSDP warns about), and the student's encoders return no taps."""
    from scaling.models.blocks import PostLNBlock, PreLNBlock

    torch.manual_seed(0)
    cls = PostLNBlock if block == "post" else PreLNBlock
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, tap = cls(16, 2, 32)(x, tap="ffn")
    assert out._base is None and tap._base is not None
    out, tap = cls(16, 2, 32)(x, tap="block")
    assert out._base is None and tap._base is None


@pytest.mark.parametrize("recipe", ["speech/tiny.yaml", "vision/tiny.yaml", "text/tiny.yaml", "vision/v2-tiny.yaml"])
def test_the_student_drops_every_tap(recipe):
    from scaling.config import load_recipe
    from scaling.data import build_loader
    from scaling.models import build_model

    r = load_recipe(REPO / "recipes" / recipe, ["train.device=cpu", "data.speech.max_samples=8000"])
    student = build_model(r.model)
    calls = []
    encoder_forward = student.encoder.forward

    def forward(*args, **kwargs):
        out = encoder_forward(*args, **kwargs)
        calls.append(len(out.taps))
        return out

    student.encoder.forward = forward
    loader = build_loader(r.data, r.model, r.masking, seed=0, rank=0, world_size=1, micro_batch_size=2,
                          max_batch_audio_samples=0, device=torch.device("cpu"))
    try:
        batch = next(iter(loader))
        student(batch)
    finally:
        loader.close()
    assert calls and all(n == 0 for n in calls), calls


def test_timeout_s_is_a_checked_engine_key(recipe_path):
    from scaling.config import RecipeError, load_recipe

    assert load_recipe(recipe_path("vision"), ["engine.timeout_s=20"]).engine.timeout_s == 20
    for bad in ("0", "-5", "1e9", ".nan"):
        with pytest.raises(RecipeError, match="engine.timeout_s"):
            load_recipe(recipe_path("vision"), [f"engine.timeout_s={bad}"])
