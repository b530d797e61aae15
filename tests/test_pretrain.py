"""End-to-end: scaling-pretrain on tiny recipes, MLflow contents, exact resume, errors before training."""

import os
import subprocess
import sys

import pytest
import torch

from scaling.checkpoint import read_state_dict
from scaling.config import load_recipe
from scaling.pretrain import run
from scaling.trainer import CollapseError

MODALITIES = ["speech", "vision", "text"]


def _env():
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return env


def _small(tmp_path, *extra):
    return [f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", *extra]


@pytest.mark.parametrize("modality", MODALITIES)
def test_30_step_run_learns_and_is_tracked(tmp_path, recipe_path, modality):
    # lr 3e-3: the text recipe's 1e-3 is tuned for 3000 steps and barely moves the loss in 30.
    sets = _small(tmp_path, "train.max_steps=30", "train.log_every=1", "checkpoint.every_steps=15",
                  "train.global_batch_size=8", "train.micro_batch_size=8", "schedule.warmup_steps=5", "optim.lr=3e-3")
    cmd = [sys.executable, "-m", "scaling.pretrain", recipe_path(modality)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint:" in proc.stdout and "MLflow run" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("data2vec-" + modality).experiment_id])
    assert run_info.data.params["train.max_steps"] == "30"
    assert run_info.data.params["model.modality"] == modality
    for key in ["loss", "lr", "train/ema_decay", "target_var", "pred_var", "train/grad_norm", "throughput/samples_per_s"]:
        assert key in run_info.data.metrics, key
    losses = [m.value for m in sorted(client.get_metric_history(run_info.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    artifacts = [a.path for a in client.list_artifacts(run_info.info.run_id)]
    assert "recipe.yaml" in artifacts
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["run.json", "step_00000015", "step_00000030"]


@pytest.mark.parametrize("modality, extra", [
    ("text", ["model.dropout=0.1"]),  # dropout: the RNG state must be restored too
    ("vision", []),  # augmentation + block masks from the data position
])
def test_resume_equals_uninterrupted(tmp_path, recipe_path, modality, extra):
    common = ["train.max_steps=20", "train.precision=fp32", "checkpoint.every_steps=5", "tracking.enabled=false",
              "train.global_batch_size=8", "train.micro_batch_size=4", *extra]
    full = run(load_recipe(recipe_path(modality), common + [f"checkpoint.dir={tmp_path}/a"]))
    first = run(load_recipe(recipe_path(modality), common + [f"checkpoint.dir={tmp_path}/b"]), stop_at_step=10)
    assert first.step == 10 and first.checkpoint.name == "step_00000010"
    resumed = run(load_recipe(recipe_path(modality), common + [f"checkpoint.dir={tmp_path}/b"]))
    assert resumed.start_step == 10 and resumed.step == 20
    torch.testing.assert_close(resumed.history[-1].loss, full.history[-1].loss, rtol=0, atol=1e-6)
    for part in ("student", "teacher"):
        a, b = read_state_dict(tmp_path / "a" / "step_00000020", part), read_state_dict(tmp_path / "b", part)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{part} {k}")


def test_accumulation_does_not_change_the_losses(tmp_path, recipe_path):
    common = ["train.max_steps=4", "train.precision=fp32", "tracking.enabled=false", "train.global_batch_size=8",
              "checkpoint.every_steps=100", "data.vision.augment=false"]
    one = run(load_recipe(recipe_path("vision"), common + ["train.micro_batch_size=8", f"checkpoint.dir={tmp_path}/a"]))
    two = run(load_recipe(recipe_path("vision"), common + ["train.micro_batch_size=2", f"checkpoint.dir={tmp_path}/b"]))
    for x, y in zip(one.history, two.history):
        assert x.num_masked == y.num_masked
        assert x.loss == pytest.approx(y.loss, rel=1e-5)


def test_bad_recipe_fails_before_training(tmp_path, recipe_path):
    cmd = [sys.executable, "-m", "scaling.pretrain", recipe_path("speech"), "--set", "train.max_stepz=3",
           "--set", f"checkpoint.dir={tmp_path}/ckpt"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown key 'train.max_stepz'" in proc.stderr and "tiny.yaml" in proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlruns.db").exists()


def test_collapse_guard_stops_with_checkpoint_and_names_the_value(tmp_path, recipe_path):
    # The guard reads the values of log steps (the step itself never waits for the device): with
    # log_every 2 the first step past after_steps=2 that it sees is step 4.
    recipe = load_recipe(recipe_path("vision"), _small(tmp_path, "train.max_steps=7", "monitor.after_steps=2",
                                                        "train.log_every=2", "monitor.min_target_var=1000",
                                                        "tracking.enabled=false"))
    with pytest.raises(CollapseError, match=r"step 4: .*target_var [0-9.]+ < monitor.min_target_var 1000") as e:
        run(recipe)
    assert "step_00000004" in str(e.value) and (tmp_path / "ckpt" / "step_00000004" / "COMPLETE").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_matches_fp32_and_keeps_fp32_weights(tmp_path, recipe_path, precision):
    common = ["train.max_steps=3", "tracking.enabled=false", "train.global_batch_size=8", "train.micro_batch_size=8",
              "checkpoint.every_steps=100", "data.vision.augment=false"]
    ref = run(load_recipe(recipe_path("vision"), common + ["train.precision=fp32", f"checkpoint.dir={tmp_path}/a"]))
    low = run(load_recipe(recipe_path("vision"), common + [f"train.precision={precision}", f"checkpoint.dir={tmp_path}/b"]))
    # Step 1's loss is computed before any update: only rounding separates the two.
    assert low.history[0].loss == pytest.approx(ref.history[0].loss, rel=0.03)
    assert low.history[0].loss != ref.history[0].loss  # autocast really ran in low precision
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in low.history)
    for part in ("student", "teacher"):  # master weights and teacher stay fp32
        assert {v.dtype for v in read_state_dict(tmp_path / "b", part).values()} == {torch.float32}
