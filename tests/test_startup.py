"""Start-up safety: what scaling-pretrain and the launchers refuse, say or skip before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from scaling.data.shards import encode_vision_sample, write_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
              "NPROC_PER_NODE", "TORCHRUN_ARGS", "DRY_RUN", "MLFLOW_TRACKING_URI")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TORCHRUN=str(BIN / "torchrun"), PYTHON=sys.executable)
    env.update(extra)
    return env


def _pretrain(tmp_path: Path, recipe: str, *sets: str, env: dict | None = None, capsys=None, monkeypatch=None):
    """scaling-pretrain's main() in this process (no interpreter start-up per call); returns (code, out, err)."""
    from scaling.pretrain import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    argv = [str(REPO / recipe)]
    for s in (f"checkpoint.dir={tmp_path}/ckpt", "tracking.enabled=false", *sets):
        argv += ["--set", s]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("scaling-pretrain: error:")]


def test_single_engine_under_two_ranks_is_an_error_naming_the_engines(tmp_path, capsys, monkeypatch):
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", env=dict(RANK="0", WORLD_SIZE="2"),
                               capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2
    assert _error_lines(err) == [
        "scaling-pretrain: error: engine.name=single trains one process, but the launcher started 2 ranks "
        "(WORLD_SIZE): use --set engine.name=fsdp (or ddp, or deepspeed), or launch one process"]
    assert not (tmp_path / "ckpt").exists()


def test_errors_print_one_line_from_rank_zero_only(tmp_path, capsys, monkeypatch):
    for rank, expected in (("0", 1), ("1", 0)):
        code, out, err = _pretrain(tmp_path, "recipes/text/tiny.yaml", "train.max_stpes=3",
                                   env=dict(RANK=rank, WORLD_SIZE="2"), capsys=capsys, monkeypatch=monkeypatch)
        assert code == 2 and len(_error_lines(err)) == expected and out == "", err
        if expected:
            assert "did you mean 'train.max_steps'?" in err


def test_size_recipe_without_train_shards_names_the_key(tmp_path, capsys, monkeypatch):
    code, out, err = _pretrain(tmp_path, "recipes/vision/base.yaml", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2
    (line,) = _error_lines(err)
    assert "'data.train_shards' is not set: --set data.train_shards=" in line and "'synthetic'" in line


def test_a_bad_batch_split_names_valid_world_sizes(tmp_path, capsys, monkeypatch):
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", "engine.name=fsdp", "train.global_batch_size=30",
                               env=dict(RANK="0", WORLD_SIZE="4"), capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2  # before any process group: nothing waits for the other 3 ranks
    (line,) = _error_lines(err)
    assert "train.global_batch_size (30) must be a multiple of the world size (4): world sizes that divide it: " \
           "2, 3, 5, 6; or, on 4 ranks, train.global_batch_size 28 or 32" in line


def test_launcher_preflight_prints_one_line_and_starts_no_rank(tmp_path):
    cmd = [str(REPO / "launchers/torchrun.sh"), str(REPO / "recipes/vision/tiny.yaml"),
           "--set", "train.max_steps=3", "--set", f"checkpoint.dir={tmp_path}/ckpt"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2
    assert _error_lines(proc.stderr) == [
        "scaling-pretrain: error: engine.name=single trains one process, but the launcher started 2 ranks "
        "(WORLD_SIZE): use --set engine.name=fsdp (or ddp, or deepspeed), or launch one process"]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "[launchers]" not in proc.stderr  # torchrun never started


def _vision_shards(tmp_path: Path, n: int = 12) -> str:
    rng = np.random.default_rng(0)
    samples = (encode_vision_sample(f"img{i:03d}", torch.from_numpy(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)),
                                    label=i % 3) for i in range(n))
    return write_shards(str(tmp_path / "shards"), samples, samples_per_shard=5)


def test_startup_says_what_data_is_read(tmp_path, capsys, monkeypatch, caplog):
    spec = _vision_shards(tmp_path)
    small = ("train.max_steps=1", "train.global_batch_size=4", "train.micro_batch_size=4")
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", f"data.train_shards={spec}", *small,
                               capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    assert f"[scaling] data: 3 shards, 12 samples from {spec}" in out
    assert "SYNTHETIC" not in out + err + caplog.text
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", f"checkpoint.dir={tmp_path}/synthetic", *small,
                               capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    assert "data: SYNTHETIC random samples (data.train_shards=synthetic)" in caplog.text


def test_a_finished_run_rerun_says_it_is_complete_and_how_to_extend(tmp_path, capsys, monkeypatch):
    small = ("train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4")
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", *small, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", *small, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    assert (f"nothing to do: {tmp_path}/ckpt/step_00000002 is step 2 and train.max_steps is 2, so this run is "
            "complete. To train longer, rerun with --set train.max_steps=N (N > 2)") in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before  # nothing written
    code, out, err = _pretrain(tmp_path, "recipes/vision/tiny.yaml", *small[1:], "train.max_steps=3",
                               capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and (tmp_path / "ckpt/step_00000003/COMPLETE").exists(), err


def test_speech_trains_on_batches_by_seconds_of_audio(tmp_path, capsys, monkeypatch):
    # 1.5 s crops: 12 s of padded audio per step in micro-batches of at most 3 s, on 2 ranks' worth of plan.
    code, out, err = _pretrain(tmp_path, "recipes/speech/tiny.yaml", "train.max_steps=3", "train.global_batch_seconds=12",
                               "train.micro_batch_seconds=3", "train.micro_batch_size=0", capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 0, err
    assert "global batch 12 s of audio = micro 48000 audio samples (padded) x accumulation 4 x world 1" in out
    import json

    info = json.loads((tmp_path / "ckpt" / "run.json").read_text())
    # Synthetic clips of 0.5-1.5 s bucketed into 3 s budgets: more than 2 clips per micro-batch on average.
    assert info["step"] == 3 and info["segments"][0]["samples"] > 3 * 4 * 2
