"""Checkpoint faults: a save the disk or the folder refuses (one line, nothing left behind, the previous
checkpoint still the newest), one job per checkpoint.dir, resumes that change the recipe, a durable
publish, and concurrent first runs on one SQLite MLflow store."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dist_harness import REPO
from scaling.checkpoint import CheckpointError, check_resume, layout, read_recipe, read_state_dict
from scaling.config import load_recipe
from scaling.plan import resolve
from scaling.pretrain import main as pretrain_main
from scaling.pretrain import run

VISION = REPO / "recipes/vision/tiny.yaml"
COMMON = ["train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8", "tracking.enabled=false",
          "checkpoint.every_steps=2", "checkpoint.keep_last=1", "schedule.warmup_steps=4"]


def _sets(tmp_path: Path, *extra: str) -> list[str]:
    return [*COMMON, f"checkpoint.dir={tmp_path}/ckpt", *extra]


def _recipe(tmp_path: Path, *extra: str):
    return load_recipe(VISION, _sets(tmp_path, *extra))


def _main(tmp_path: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    """scaling-pretrain in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    code = pretrain_main([str(VISION)] + sum([["--set", s] for s in _sets(tmp_path, *extra)], []))
    return code, capsys.readouterr().err.strip().splitlines()


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------- saves the disk refuses
def _fail_optimizer_file(monkeypatch, exn: BaseException) -> None:
    """torch.save of the optimizer state writes part of its file, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name == "optimizer.pt":
            Path(f).write_bytes(b"x" * 4096)
            raise exn
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


FREE = 398_100  # what the simulated full disk has left


def _full_disk(monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=FREE))


FAULTS = {
    "ENOSPC mid-write": (lambda mp: _fail_optimizer_file(mp, OSError(errno.ENOSPC, "No space left on device")),
                         "no space left on device (ENOSPC)", None),
    # torch's zip writer reports a full disk as this RuntimeError; only the free space tells
    "torch's RuntimeError on a full disk": (
        lambda mp: (_fail_optimizer_file(mp, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected "
                                                          "pos 398208 vs 398100")), _full_disk(mp)),
        "no space left on device (RuntimeError: [enforce fail", FREE),
    "quota at the fsync before publishing": (
        lambda mp: mp.setattr(layout, "sync_tree", lambda root: (_ for _ in ()).throw(
            OSError(errno.EDQUOT, "Disk quota exceeded"))), "disk quota exceeded (EDQUOT)", None),
    "read-only folder": (
        lambda mp: mp.setattr(Path, "mkdir", _read_only(Path.mkdir)), "the file system is read-only (EROFS", None),
}


def _read_only(real):
    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp_step_"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    return mkdir


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_refused_save_is_one_line_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                      fault):
    assert _main(tmp_path, capsys, "train.max_steps=2")[0] == 0
    ckpt, previous = tmp_path / "ckpt", tmp_path / "ckpt" / "step_00000002"
    before = {part: read_state_dict(previous, part) for part in ("student", "teacher")}
    need = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    inject, reason, free = FAULTS[fault]
    with monkeypatch.context() as mp:
        inject(mp)
        code, err = _main(tmp_path, capsys, "train.max_steps=4")  # saves step 4, keep_last 1
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"scaling-pretrain: error: step 4: checkpoint not written to {ckpt}: {reason}"), err
    got = re.search(r"it needs about ([\d,.]+ MiB), ([\d,.]+ MiB) free there\. Previous checkpoints are kept, the "
                    r"newest is (\S+)$", err[0])
    assert got and got[1] == _mib(need) and got[3] == str(previous), err
    if free is not None:
        assert got[2] == _mib(free)
    # no temporary folder, no lock, nothing pruned: the previous checkpoint is the newest, intact and unchanged
    assert _listing(ckpt) == ["run.json", "step_00000002"]
    assert layout.find_latest(ckpt) == previous
    for part, tensors in before.items():
        after = read_state_dict(ckpt, part)
        assert after.keys() == tensors.keys() and all(torch.equal(after[k], v) for k, v in tensors.items())
    # the same command, the disk fine again, continues from step 2 (and prunes step 2 once step 4 is complete)
    resumed = run(_recipe(tmp_path, "train.max_steps=4"))
    assert (resumed.start_step, resumed.step) == (2, 4)
    assert _listing(ckpt) == ["run.json", "step_00000004"]


def test_a_runtime_error_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    run(_recipe(tmp_path, "train.max_steps=2"))
    _fail_optimizer_file(monkeypatch, RuntimeError("some other writer bug"))
    with pytest.raises(RuntimeError, match="^some other writer bug$"):
        run(_recipe(tmp_path, "train.max_steps=4"))
    assert _listing(tmp_path / "ckpt") == ["run.json", "step_00000002"]


def test_what_failed_saves_left_is_removed_at_start_up(tmp_path, caplog):
    run(_recipe(tmp_path, "train.max_steps=2"))
    stale = tmp_path / "ckpt" / ".tmp_step_00000003"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"cut")
    with caplog.at_level(logging.WARNING, logger="scaling.checkpoint"):
        run(_recipe(tmp_path, "train.max_steps=4"))
    assert not stale.exists() and _listing(tmp_path / "ckpt") == ["run.json", "step_00000004"]
    assert any(f"removed {stale}, left by a save that did not complete" in r.getMessage() for r in caplog.records)


def test_publishing_syncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    tmp, final = tmp_path / ".tmp_step_00000001", tmp_path / "step_00000001"
    (tmp / "dcp").mkdir(parents=True)
    for rel in ("dcp/__0_0.distcp", "dcp/.metadata", "meta.json", "COMPLETE"):
        (tmp / rel).write_bytes(b"data")
    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(("rename", str(self))),
                                                              real_rename(self, target))[1])
    layout.publish(tmp, final)
    assert (final / "dcp/.metadata").read_bytes() == b"data" and not tmp.exists()
    rename = events.index(("rename", str(tmp)))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    expected = {str(p) for p in tmp_path.rglob("*")}  # the files and folders, now under final
    assert {p.replace(str(tmp), str(final)) for p in synced_before} == {p for p in expected}
    assert str(tmp) in synced_before and str(tmp / "dcp") in synced_before
    assert events[rename + 1:] == [("fsync", str(tmp_path))]


# ----------------------------------------------------------------------------- one job per checkpoint.dir
_HOLDER = """
import sys
from scaling.checkpoint.lock import FolderLock
lock = FolderLock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def test_a_live_job_keeps_its_folder_and_a_dead_ones_lock_does_not(tmp_path, capsys, caplog):
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), SLURM_JOB_ID="4242")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ckpt)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = _main(tmp_path, capsys, "train.max_steps=2")
        assert code == 2 and len(err) == 1, err
        assert err[0] == (f"scaling-pretrain: error: {ckpt}: checkpoint.dir is in use by another live job (host "
                          f"{socket.gethostname()}, pid {holder.pid}, job 4242, since ") + err[0].split("since ")[1]
        assert "use another checkpoint.dir" in err[0]
        assert _listing(ckpt) == [".lock"]  # the refused job wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: its lock file and owner record stay behind
        holder.wait()
    assert _listing(ckpt) == [".lock"]
    with caplog.at_level(logging.INFO, logger="scaling.checkpoint"):
        assert _main(tmp_path, capsys, "train.max_steps=2")[0] == 0
    assert any(f"taking over from a job that is no longer running (host {socket.gethostname()}, pid {holder.pid}, "
               "job 4242" in r.getMessage() for r in caplog.records)
    assert _listing(ckpt) == ["run.json", "step_00000002"]  # let go at the end


def test_resume_never_into_a_folder_with_checkpoints_is_refused(tmp_path, capsys):
    run(_recipe(tmp_path, "train.max_steps=2"))
    code, err = _main(tmp_path, capsys, "train.max_steps=2", "checkpoint.resume=never")
    assert code == 2 and len(err) == 1, err
    assert (f"{tmp_path}/ckpt: checkpoint.resume=never, but this checkpoint.dir holds checkpoints of an earlier run "
            f"(newest: {tmp_path}/ckpt/step_00000002)") in err[0]
    assert _listing(tmp_path / "ckpt") == ["run.json", "step_00000002"]


# ----------------------------------------------------------------------------- resumes that change the recipe
def test_a_resume_with_another_lr_trains_with_it(tmp_path, caplog):
    lrs = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
    try:
        run(load_recipe(VISION, [*COMMON, f"checkpoint.dir={tmp_path}/ref", "train.max_steps=6",
                                             "optim.lr=2e-3"]))
        uninterrupted, lrs[:] = list(lrs), []
        run(_recipe(tmp_path, "train.max_steps=6", "optim.lr=1e-3"), stop_at_step=3)
        first, lrs[:] = list(lrs), []
        with caplog.at_level(logging.WARNING, logger="scaling"):
            resumed = run(_recipe(tmp_path, "train.max_steps=6", "optim.lr=2e-3"))
    finally:
        handle.remove()
    assert resumed.start_step == 3 and len(lrs) == 3 and len(uninterrupted) == 6
    assert first == [[lr / 2 for lr in step] for step in uninterrupted[:3]]  # the old peak, the same schedule
    assert lrs == uninterrupted[3:]  # each step after the resume at the new peak's schedule value
    assert any("optim.lr 0.001 -> 0.002 (in step_00000003 -> now): applied from step 3 on" in r.getMessage()
               for r in caplog.records)
    assert read_recipe(tmp_path / "ckpt").optim.lr == 2e-3  # what ran


@pytest.mark.parametrize("change, expected", [
    (["model.dim=32", "model.heads=2"], r"holds another model: model\.dim 64 -> 32; model\.heads 4 -> 2"),
    (["masking.vision.ratio=0.4", "seed=7"], r"settings that cannot change mid-run: masking\.vision\.ratio 0\.2 -> "
                                             r"0\.4; seed 0 -> 7\. Resume with the checkpoint's values"),
    (["data.vision.augment=false"], r"cannot change mid-run: data\.vision\.augment True -> False"),
])
def test_a_resume_that_changes_what_cannot_change_is_refused(tmp_path, change, expected):
    run(_recipe(tmp_path, "train.max_steps=2"))
    ckpt = tmp_path / "ckpt" / "step_00000002"
    resumed = resolve(_recipe(tmp_path, "train.max_steps=4", *change), 1, read_data=False).resolved()
    with pytest.raises(CheckpointError, match=expected) as e:
        check_resume(ckpt, resumed, world_size=1, checkpoint_format="full")
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)
    # the unchanged recipe resumes (the refusal is about the change)
    same = resolve(_recipe(tmp_path, "train.max_steps=4"), 1, read_data=False).resolved()
    assert check_resume(ckpt, same, world_size=1, checkpoint_format="full") == [
        "train.max_steps changed from 2 (in step_00000002) to 4: the LR and EMA schedules are re-planned over the "
        "new length from step 2 on"]


# ----------------------------------------------------------------------------- MLflow: concurrent first runs
def _first_run(uri: str, name: str, barrier) -> str:
    from scaling.tracking import Tracker

    recipe = load_recipe(VISION, ["tracking.system_metrics_every_s=0", f"tracking.uri={uri}",
                                  f"tracking.run_name={name}"])
    tracker = Tracker(recipe.tracking, active=True)
    barrier.wait()  # all three open the fresh store at once
    tracker.start(recipe)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    return tracker.run_id


def _first_run_worker(uri, name, barrier, results):
    try:
        results.put((name, _first_run(uri, name, barrier)))
    except BaseException as exn:  # noqa: BLE001  (reported to the test)
        results.put((name, f"FAILED {type(exn).__name__}: {exn}"))


def test_three_concurrent_first_runs_on_one_fresh_sqlite_store_all_succeed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_first_run_worker, args=(uri, f"run{i}", barrier, results)) for i in range(3)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not any(v.startswith("FAILED") for v in got.values()), got
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_recipe(VISION).tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(got.values())
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]
    assert not (tmp_path / "mlruns.db.lock").exists()


# ----------------------------------------------------------------------------- a kill during a save
_KILL_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
real = torch.save
def save(obj, f, *args, **kwargs):
    # the second save (step 4): half of the optimizer file, then the process dies as under kill -9
    if Path(str(f)).name == "optimizer.pt" and ".tmp_step_00000004" in str(f):
        Path(f).write_bytes(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
from scaling.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_save_keeps_the_previous_checkpoint_and_the_run_continues(tmp_path):
    extra = ("train.max_steps=6",)
    sets = sum([["--set", s] for s in _sets(tmp_path, *extra)], [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(VISION), *sets], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    assert layout.find_latest(ckpt).name == "step_00000002"  # the torn save is not taken
    assert any(p.name.startswith(".tmp_step_00000004") for p in ckpt.iterdir())
    # The same command again: resumes at step 2, removes the torn save, ends equal to an uninterrupted run.
    resumed = run(_recipe(tmp_path, *extra))
    assert resumed.start_step == 2 and resumed.step == 6
    assert not any(p.name.startswith(".tmp_") for p in ckpt.iterdir())
    run(_recipe(tmp_path / "plain", *extra))
    for part in ("student", "teacher"):
        got, want = read_state_dict(ckpt, part), read_state_dict(tmp_path / "plain" / "ckpt", part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
