"""Numerical faults, preemption and exact LayerDrop resume (scaling/trainer.py, Engine.step).

- A non-finite loss at step k (injected: the step's loss times NaN, so its gradients are NaN too) is
  skipped: the weights, the teacher, the optimizer and LR-scheduler state after step k equal those
  after step k-1 of a clean run, bit for bit; the skip is counted (step stats, run.json, MLflow).
- ``train.max_skipped_steps`` consecutive skips stop the run: exit code 1, a message naming the steps,
  a checkpoint holding the last good weights. fp16 overflows halve the loss scale, and its underflow
  is reported.
- SIGTERM to one rank of a 2-rank FSDP run (gloo) mid-step: both ranks save that step and exit 0;
  resuming to the end gives weights bit-equal to the uninterrupted 2-rank run. The runs use speech
  LayerDrop 0.5, so they also check that both ranks drop the same blocks: the uninterrupted FSDP run
  equals the single-process run (same seeds, same blocks dropped).
- Speech (v1 and 2.0) with LayerDrop 0.5 resumed equals the uninterrupted run.
- The SLURM scripts relay SIGUSR1 to the job step and requeue the job after it exits 0 (stubbed SLURM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_harness import REPO, free_port, run_recipe, run_single, spawn
from scaling.checkpoint import read_state_dict
from scaling.config import load_recipe
from scaling.pretrain import main, run
from scaling.trainer import DivergenceError, Trainer

SPEECH_EQUAL_LENGTHS = "data.speech.max_samples=8000"  # no padding: 2 x 4 equals 1 x 8 (test_engine_fsdp.py)


def _recipe(modality: str) -> str:
    return str(REPO / "recipes" / (f"{modality}.yaml" if "/" in modality else f"{modality}/tiny.yaml"))


def _sets(tmp_path, name: str, *extra: str) -> list[str]:
    return ["train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8", "tracking.enabled=false",
            "checkpoint.every_steps=100", "data.vision.augment=false", f"checkpoint.dir={tmp_path}/{name}", *extra]


def _poison(monkeypatch, steps: set[int]) -> None:
    """The loss of the given (1-based) steps times NaN: NaN loss and NaN gradients, as a real overflow."""
    import scaling.trainer

    loss_fn, step_fn = scaling.trainer.regression_loss, Trainer.train_step
    current = {}

    def train_step(self, *args, **kwargs):
        current["step"] = self.step + 1
        return step_fn(self, *args, **kwargs)

    def regression_loss(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        return out * float("nan") if current.get("step") in steps else out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(scaling.trainer, "regression_loss", regression_loss)


def _assert_same_state(a: Path, b: Path) -> None:
    for part in ("student", "teacher"):
        x, y = read_state_dict(a, part), read_state_dict(b, part)
        assert x.keys() == y.keys() and x
        for k in x:
            assert torch.equal(x[k], y[k]), f"{part} {k}"


def _assert_same_optimizer(a: Path, b: Path) -> None:
    x, y = (torch.load(p / "optimizer.pt", weights_only=False) for p in (a, b))
    assert x["scheduler"] == y["scheduler"]  # no LR step either
    assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"]
    sx, sy = x["optimizer"]["state"], y["optimizer"]["state"]
    assert sx.keys() == sy.keys() and sx
    for i in sx:
        for k in sx[i]:
            assert torch.equal(sx[i][k], sy[i][k]), (i, k)


@pytest.fixture(scope="module")
def clean_step2(tmp_path_factory):
    """A clean vision run stopped at step 2 (the last good state of the poisoned runs below)."""
    tmp = tmp_path_factory.mktemp("clean")
    run(load_recipe(_recipe("vision"), _sets(tmp, "ckpt", "train.max_steps=6")), stop_at_step=2)
    return tmp / "ckpt" / "step_00000002"


def test_nan_loss_step_is_skipped_and_counted(tmp_path, monkeypatch, clean_step2):
    _poison(monkeypatch, {3})
    sets = _sets(tmp_path, "ckpt", "train.max_steps=6", "train.log_every=1", "tracking.enabled=true",
                 f"tracking.uri=sqlite:///{tmp_path}/mlruns.db")
    result = run(load_recipe(_recipe("vision"), sets), stop_at_step=3)
    # Step 3 changed nothing: student, teacher, AdamW moments and step counts, LR schedule.
    _assert_same_state(tmp_path / "ckpt" / "step_00000003", clean_step2)
    _assert_same_optimizer(tmp_path / "ckpt" / "step_00000003", clean_step2)
    assert [h.skipped for h in result.history] == [False, False, True]
    assert torch.isnan(torch.tensor(result.history[2].loss))
    segment = json.loads((tmp_path / "ckpt" / "run.json").read_text())["segments"][-1]
    assert segment["skipped_steps"] == 1 and segment["skipped"] == [3]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    skipped = client.get_metric_history(result.mlflow_run_id, "train/skipped_steps")
    assert [(m.step, m.value) for m in sorted(skipped, key=lambda m: m.step)] == [(1, 0.0), (2, 0.0), (3, 1.0)]

    # The run continues from there (the poison is for step 3 only): the next steps train again.
    resumed = run(load_recipe(_recipe("vision"), sets[:-2] + ["tracking.enabled=false", "checkpoint.resume=auto"]))
    assert resumed.start_step == 3 and resumed.step == 6
    assert not any(h.skipped for h in resumed.history)
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in resumed.history)


def test_consecutive_nan_steps_stop_the_run_with_the_last_good_state(tmp_path, monkeypatch, capsys, clean_step2):
    _poison(monkeypatch, set(range(3, 100)))
    sets = _sets(tmp_path, "ckpt", "train.max_steps=20", "train.max_skipped_steps=3")
    rc = main([_recipe("vision"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 1
    assert "step 5: 3 consecutive steps (3-5) had a non-finite loss or gradient norm" in err, err
    assert "train.max_skipped_steps=3" in err and "step_00000005" in err and "weights of step 2" in err, err
    assert (tmp_path / "ckpt" / "step_00000005" / "COMPLETE").exists()
    _assert_same_state(tmp_path / "ckpt" / "step_00000005", clean_step2)
    _assert_same_optimizer(tmp_path / "ckpt" / "step_00000005", clean_step2)
    with pytest.raises(DivergenceError, match=r"^step 5: "):
        run(load_recipe(_recipe("vision"), sets + [f"checkpoint.dir={tmp_path}/again"]))


def test_fp16_overflow_halves_the_loss_scale_and_underflow_is_reported(tmp_path, monkeypatch, caplog):
    # GradScaler starts at 2**16 and halves on every overflow: 17 overflows in a row take it below 1.
    _poison(monkeypatch, set(range(2, 100)))
    sets = _sets(tmp_path, "ckpt", "train.max_steps=30", "train.precision=fp16", "train.max_skipped_steps=18")
    with caplog.at_level("WARNING", logger="scaling.trainer"), pytest.raises(DivergenceError, match="step 19: 18"):
        run(load_recipe(_recipe("vision"), sets))
    lines = [r.getMessage() for r in caplog.records]
    assert any("step 2 skipped" in m and "fp16 loss scale now 32768" in m for m in lines), lines
    underflow = [m for m in lines if "loss-scale underflow" in m]
    assert underflow and underflow[0].startswith("step 17: the fp16 loss scale is down to 1:"), underflow


@pytest.mark.parametrize("modality", ["speech", "speech/v2-tiny"])
def test_speech_layerdrop_resume_equals_uninterrupted(tmp_path, modality):
    common = _sets(tmp_path, "a", "train.max_steps=6", "model.speech.layerdrop=0.5", SPEECH_EQUAL_LENGTHS)
    full = run(load_recipe(_recipe(modality), common))
    run(load_recipe(_recipe(modality), common + [f"checkpoint.dir={tmp_path}/b"]), stop_at_step=3)
    resumed = run(load_recipe(_recipe(modality), common + [f"checkpoint.dir={tmp_path}/b"]))
    assert resumed.start_step == 3
    assert [h.loss for h in resumed.history] == [h.loss for h in full.history[3:]]
    _assert_same_state(tmp_path / "a" / "step_00000006", tmp_path / "b" / "step_00000006")
    # LayerDrop really drops: without it the same run trains otherwise.
    plain = run(load_recipe(_recipe(modality), common[:-2] + [SPEECH_EQUAL_LENGTHS, f"checkpoint.dir={tmp_path}/c"]))
    assert [h.loss for h in plain.history] != [h.loss for h in full.history]


# ----------------------------------------------------------------------------- SIGTERM on 2 ranks
def _preemption_jobs(tmp: str, ports: list[int]) -> dict:
    """In each rank: an uninterrupted FSDP run; the same run where rank 1 gets SIGTERM during step 3
    (through the CLI, for its exit code); its resume to the end."""
    common = ["engine.name=fsdp", "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=4",
              "train.max_steps=6", "tracking.enabled=false", "checkpoint.every_steps=100",
              "model.speech.layerdrop=0.5", SPEECH_EQUAL_LENGTHS]
    full = run_recipe("speech", common + [f"checkpoint.dir={tmp}/full"])
    os.environ["MASTER_PORT"] = str(ports[0])
    step_fn = Trainer.train_step

    def train_step(self, *args, **kwargs):
        if self.engine.rank == 1 and self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now, in the middle of step 3
        return step_fn(self, *args, **kwargs)

    Trainer.train_step = train_step
    try:
        rc = main([_recipe("speech"), *[a for s in common + [f"checkpoint.dir={tmp}/stopped"] for a in ("--set", s)]])
    finally:
        Trainer.train_step = step_fn
    saved = sorted(p.name for p in Path(tmp, "stopped").glob("step_*"))
    os.environ["MASTER_PORT"] = str(ports[1])
    resumed = run_recipe("speech", common + [f"checkpoint.dir={tmp}/stopped"])
    return {"full": full, "rc": rc, "saved": saved, "resumed": resumed}


def test_sigterm_saves_at_the_next_step_boundary_and_resumes_exactly(tmp_path):
    ranks = spawn(_preemption_jobs, str(tmp_path), [free_port(), free_port()])
    assert [r["rc"] for r in ranks] == [0, 0]
    assert ranks[0]["saved"] == ["step_00000003"]  # the step the signal arrived in, on both ranks' behalf
    info = json.loads((tmp_path / "stopped" / "run.json").read_text())
    assert info["segments"][0]["preempted_at"] == 3 and info["segments"][-1]["step"] == 6
    for r in ranks:
        assert r["resumed"]["losses"] == r["full"]["losses"][3:]
    _assert_same_state(tmp_path / "full" / "step_00000006", tmp_path / "stopped" / "step_00000006")
    # Both ranks dropped the same blocks: the 2-rank run equals the single-process one.
    ref = run_single("speech", ["train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8",
                                "train.max_steps=6", "tracking.enabled=false", "checkpoint.every_steps=100",
                                "model.speech.layerdrop=0.5", SPEECH_EQUAL_LENGTHS, f"checkpoint.dir={tmp_path}/ref"])
    torch.testing.assert_close(torch.tensor(ranks[0]["full"]["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    for k, v in ref["state"].items():
        if k.startswith("teacher."):
            torch.testing.assert_close(ranks[0]["full"]["state"][k], v, rtol=0, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- SLURM relay and requeue
def test_slurm_script_relays_usr1_and_requeues(tmp_path):
    """slurm_torchrun.sbatch with stub srun/scancel/scontrol: SIGUSR1 to the batch shell is relayed to the
    step (scancel --signal=USR1 JOB), and the job is requeued once the step exits 0."""
    stubs, log = tmp_path / "stubs", tmp_path / "calls"
    stubs.mkdir()
    stub = {
        "scontrol": 'echo "scontrol $*" >>"$LOG"; [[ $1 == show ]] && printf "n0\\n"; true',
        # The "step": a process that exits 0 on SIGUSR1, as the ranks do after their checkpoint; it
        # writes its pid to $READY once its handler is in place.
        "srun": "echo srun >>\"$LOG\"; exec python3 -c 'import os, signal, sys, time; "
                "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0)); open(sys.argv[1] + \".tmp\", \"w\").write("
                "str(os.getpid())); os.rename(sys.argv[1] + \".tmp\", sys.argv[1]); time.sleep(60); sys.exit(3)' "
                "\"$READY\"",
        "scancel": 'echo "scancel $*" >>"$LOG"; kill -USR1 "$(cat "$READY")"',
    }
    for name, body in stub.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stubs}:{env.get('PATH', '/usr/bin:/bin')}", LOG=str(log), READY=str(ready), SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="n0", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(REPO))
    proc = subprocess.Popen(["bash", str(REPO / "launchers/slurm_torchrun.sbatch"), _recipe("text")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    assert calls[-2:] == ["scancel --signal=USR1 77", "scontrol requeue 77"], calls
