"""Tracking: what a run leaves in MLflow and in run.json, the log line, RankMe, the FLOP count, a real server."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from dist_harness import REPO, free_port, spawn
from scaling.config import load_recipe
from scaling.data.quality import BAD_KINDS, SHARD_EVENTS, STAT_NAMES
from scaling.flops import forward_flops
from scaling.models import build_model
from scaling.rankme import effective_rank
from scaling.tracking import RUN_JSON, read_run_json, tracking_uri
from scaling.trainer import CollapseError, data_metrics

VISION = REPO / "recipes" / "vision" / "tiny.yaml"


# ----------------------------------------------------------------------------- RankMe
def _rankme_numpy(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_numpy_and_sees_rank_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g) @ torch.diag(torch.logspace(0, -2, 32))  # a spread spectrum
    assert effective_rank(x) == pytest.approx(_rankme_numpy(x.numpy()), rel=1e-6)
    one = torch.randn(100, 1, generator=g) @ torch.randn(1, 64, generator=g)  # every row on one direction
    assert effective_rank(one) == pytest.approx(1.0, abs=1e-3)
    iso = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]  # orthonormal rows: all singular values equal
    assert effective_rank(iso) == pytest.approx(64.0, rel=1e-4)


# ----------------------------------------------------------------------------- FLOPs
def _tiny_batch(modality: str, cfg, B: int = 3, lengths=None):
    g = torch.Generator().manual_seed(1)
    if modality == "vision":
        v = cfg.vision
        n = (v.image_size // v.patch_size) ** 2
        return {"image_BCHW": torch.randn(B, v.channels, v.image_size, v.image_size, generator=g),
                "mask_BT": torch.rand(B, n, generator=g) < 0.3}
    if modality == "text":
        lengths = lengths or [40] * B
        T = max(lengths)
        pad = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
        tokens = torch.randint(5, cfg.text.vocab_size, (B, T), generator=g).masked_fill(pad, cfg.text.pad_id)
        return {"tokens_BT": tokens, "input_tokens_BT": tokens.clone(), "padding_mask_BT": pad,
                "mask_BT": (torch.rand(B, T, generator=g) < 0.3) & ~pad}
    from scaling.models.speech import conv_output_length

    S = 8000
    frames = conv_output_length(S, cfg.speech.conv_layers)
    return {"audio_BT": torch.randn(B, S, generator=g), "audio_padding_BT": torch.zeros(B, S, dtype=torch.bool),
            "mask_BT": torch.rand(B, frames, generator=g) < 0.3}


def _counted_forward(cfg, model, batch) -> float:
    """FLOPs torch counts for the student's forward and the teacher's (SDPA on its math kernel, so
    the attention matmuls are visible to FlopCounterMode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    teacher = copy.deepcopy(model.encoder)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(batch)
        teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT, num_taps=2)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("modality", ["vision", "text", "speech"])
def test_flops_match_torch_flop_counter(recipe_path, modality):
    # The formula counts matmuls and convolutions only, as FlopCounterMode does; within 1% (nothing
    # else should differ: the tolerance only absorbs what a future torch might count in addition).
    cfg = load_recipe(recipe_path(modality), ["data.train_shards=synthetic"]).model
    model = build_model(cfg).eval()
    batch = _tiny_batch(modality, cfg)
    mask = batch["mask_BT"]
    if modality == "speech":
        lengths, audio = [mask.shape[1]] * mask.shape[0], [batch["audio_BT"].shape[1]] * mask.shape[0]
    else:
        lengths, audio = [mask.shape[1]] * mask.shape[0], None
    ours = forward_flops(cfg, lengths, int(mask.sum()), audio)
    assert ours.student + ours.teacher_input + ours.teacher == pytest.approx(_counted_forward(cfg, model, batch),
                                                                               rel=0.01)
    assert ours.step == 3 * ours.student + ours.teacher_input + ours.teacher


def test_flops_of_a_padded_batch_count_only_the_real_tokens(recipe_path):
    cfg = load_recipe(recipe_path("text"), ["data.train_shards=synthetic"]).model
    model = build_model(cfg).eval()
    lengths = [40, 25, 9]
    batch = _tiny_batch("text", cfg, lengths=lengths)
    # Each row alone, unpadded: what the padded batch does usefully.
    alone = sum(_counted_forward(cfg, model, {k: v[i : i + 1, :n] for k, v in batch.items()})
                for i, n in enumerate(lengths))
    ours = forward_flops(cfg, lengths, int(batch["mask_BT"].sum()))
    assert ours.student + ours.teacher == pytest.approx(alone, rel=0.01)


# ----------------------------------------------------------------------------- metric names
def test_bad_sample_counters_appear_once_non_zero_and_stay():
    data = dict.fromkeys(STAT_NAMES, 0.0) | {"read": 10.0, "good": 10.0, "items": 10.0}
    seen: set[str] = set()
    clean = data_metrics(data, seen)
    assert clean == {"data/samples_read": 10.0, "data/samples": 10.0, "data/items": 10.0}
    kind = BAD_KINDS[2]
    bad = data_metrics(data | {kind: 1.0, "read": 11.0}, seen)
    assert bad[f"data/bad/{kind}"] == 1.0 and not any(k.startswith("data/bad/") and k != f"data/bad/{kind}" for k in bad)
    later = data_metrics(data | {kind: 1.0, "read": 12.0, "good": 11.0}, seen)  # the curve continues
    assert later[f"data/bad/{kind}"] == 1.0
    assert set(BAD_KINDS + SHARD_EVENTS) <= set(STAT_NAMES)


# ----------------------------------------------------------------------------- in one process
@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An initialised empty SQLite store to copy: creating one runs MLflow's migrations (seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _vision_sets(tmp_path, *extra):
    return ["data.train_shards=synthetic", "train.precision=fp32", "train.global_batch_size=8",
            "train.micro_batch_size=8", "train.log_every=1", "checkpoint.every_steps=100",
            "tracking.system_metrics_every_s=0", f"checkpoint.dir={tmp_path}/ckpt", *extra]


def test_env_uri_wins_and_log_lines_without_a_terminal(tmp_path, monkeypatch, caplog, empty_store):
    from mlflow.tracking import MlflowClient

    from scaling.pretrain import run

    shutil.copy(empty_store, tmp_path / "env.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")  # relative: resolved against the cwd
    stderr = io.StringIO()  # not a terminal: no tqdm bar may be drawn on it
    monkeypatch.setattr(sys, "stderr", stderr)
    caplog.set_level(logging.INFO, logger="scaling.trainer")
    recipe = load_recipe(VISION, _vision_sets(tmp_path, "train.max_steps=2", f"tracking.uri=sqlite:///{tmp_path}/recipe.db"))
    result = run(recipe)
    lines = [r.getMessage() for r in caplog.records if r.name == "scaling.trainer" and r.getMessage().startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/2", "step 2/2"]
    for part in ("loss ", "lr ", "grad norm ", "samples/s", "tokens/s", "data wait ", "peak mem ", "ETA "):
        assert part in lines[-1], (part, lines[-1])
    assert "pretrain" not in stderr.getvalue()  # the bar's description
    assert not (tmp_path / "recipe.db").exists()
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    assert tracking_uri("sqlite:///env.db") == uri
    assert result.run_info["mlflow"]["tracking_uri"] == uri
    assert MlflowClient(uri).get_run(result.mlflow_run_id).data.metrics["loss"] == pytest.approx(result.history[-1].loss)


def test_probe_logs_into_the_run_of_its_checkpoint(tmp_path, empty_store):
    from mlflow.tracking import MlflowClient

    from scaling.data import write_shards
    from scaling.pretrain import run
    from scaling.probe import probe
    from test_probe import _stripes

    shutil.copy(empty_store, tmp_path / "train.db")
    uri = f"sqlite:///{tmp_path}/train.db"
    trained = run(load_recipe(VISION, _vision_sets(tmp_path, "train.max_steps=2", f"tracking.uri={uri}")))
    train = write_shards(str(tmp_path / "data"), _stripes(24, 0), prefix="train", samples_per_shard=24)
    test = write_shards(str(tmp_path / "data"), _stripes(12, 1), prefix="test", samples_per_shard=12)
    # --tracking-uri names another store: the run's own (from run.json) is used, where the run is.
    result = probe(tmp_path / "ckpt", train, test, tracking_uri=f"sqlite:///{tmp_path}/elsewhere.db", verbose=False)
    assert result["mlflow_run_id"] == trained.mlflow_run_id
    client = MlflowClient(uri)
    (m,) = client.get_metric_history(trained.mlflow_run_id, "probe/linear_acc")
    assert m.step == 2 and m.value == pytest.approx(result["linear_acc"])
    assert len(client.search_runs([client.get_experiment_by_name("data2vec-vision").experiment_id])) == 1
    assert not (tmp_path / "elsewhere.db").exists()


def test_collapse_guard_fires_on_the_target_rank(tmp_path):
    from scaling.pretrain import run

    recipe = load_recipe(VISION, _vision_sets(tmp_path, "train.max_steps=3", "tracking.enabled=false",
                                              "monitor.after_steps=1", "monitor.min_target_rank=1000"))
    with pytest.raises(CollapseError, match=r"step 2: .*target rank \(RankMe\) [0-9.]+ < monitor.min_target_rank 1000"):
        run(recipe)


# ----------------------------------------------------------------------------- 2 ranks
def _jobs(jobs: list[tuple[list[str], int | None]], ports: list[int]) -> list[dict]:
    """Runs of the vision tiny recipe one after the other in this rank (each later one on the next port)."""
    from scaling.pretrain import run

    out = []
    for i, (overrides, stop) in enumerate(jobs):
        if i:
            os.environ["MASTER_PORT"] = str(ports[i - 1])
        result = run(load_recipe(VISION, overrides), stop_at_step=stop, recipe_path=VISION)
        out.append({"run_id": result.mlflow_run_id, "info": result.run_info, "step": result.step,
                    "samples": [h.samples for h in result.history], "tokens": [h.tokens for h in result.history]})
    return out


def _two_rank_sets(tmp_path, uri: str, *extra):
    return ["data.train_shards=synthetic", "engine.name=fsdp", "train.precision=fp32", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.log_every=1", "checkpoint.every_steps=2",
            "tracking.system_metrics_every_s=1", f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri={uri}",
            "tracking.experiment=tracking-test", *extra]


def test_two_rank_run_resumed_appends_to_one_mlflow_run(tmp_path, empty_store):
    from mlflow.tracking import MlflowClient

    shutil.copy(empty_store, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    first, resumed = spawn(_jobs, [(_two_rank_sets(tmp_path, uri, "train.max_steps=3"), 2),
                                   (_two_rank_sets(tmp_path, uri, "train.max_steps=4"), None)], [free_port()])[0]
    # Counted, not planned: 8 rows a step summed over 2 ranks x 2 micro-batches, 50 encoder positions each.
    assert first["samples"] == [8, 8] and resumed["samples"] == [8, 8]
    assert resumed["tokens"] == [8 * 50] * 2
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id])
    run_id = mlrun.info.run_id
    assert first["run_id"] == resumed["run_id"] == run_id
    tags, params, metrics = mlrun.data.tags, mlrun.data.params, mlrun.data.metrics
    assert {k: tags[k] for k in ("modality", "size", "engine", "world_size", "precision", "device")} == \
        {"modality": "vision", "size": "tiny", "engine": "fsdp", "world_size": "2", "precision": "fp32", "device": "cpu"}
    assert tags["recipe"] == str(VISION) and tags["plan"] == "global batch 8 = micro 2 x accumulation 2 x world 2"
    assert "zero_stage" not in tags
    # Params are the first segment's; the resume's change is a tag and a text artifact.
    assert params["train.max_steps"] == "3" and params["run.world_size"] == "2"
    assert tags["resume/2/train.max_steps"] == "3 -> 4"
    changes = open(client.download_artifacts(run_id, "resume/step_00000002.txt", str(tmp_path / "dl"))).read()
    assert "train.max_steps: 3 -> 4" in changes
    for key in ("loss", "lr", "target_var", "pred_var", "throughput/samples_per_s", "throughput/tokens_per_s",
                "train/grad_norm", "rank/target", "rank/student", "data/samples", "memory/peak_bytes"):
        assert key in metrics, key
    assert not any(k.startswith("data/bad/") for k in metrics)  # a clean run: no bad-sample charts
    assert any(k.startswith("system/") for k in metrics)  # MLflow's own system metrics
    assert "mfu" not in metrics  # CPU: no peak FLOP/s known
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"recipe.yaml", "run.json", "plots/loss.png", "plots/variance.png", "plots/lr.png"} <= artifacts
    # run.json beside the checkpoints names the same run and the newest checkpoint; resume kept the segments.
    info = read_run_json(tmp_path / "ckpt")
    assert info == resumed["info"] and info["mlflow"]["run_id"] == run_id and info["mlflow"]["tracking_uri"] == uri
    assert info["checkpoint"] == str(tmp_path / "ckpt" / "step_00000004") and info["step"] == 4
    assert info["world_size"] == 2 and info["engine"] == "fsdp"
    assert [(s["start_step"], s["step"], s["samples"]) for s in info["segments"]] == [(0, 2, 16), (2, 4, 16)]
    assert info["final"]["loss"] == pytest.approx(metrics["loss"]) and info["throughput"]["samples_per_s"] > 0
    logged = json.load(open(client.download_artifacts(run_id, RUN_JSON, str(tmp_path / "dl"))))
    assert logged["mlflow"]["run_id"] == run_id and logged["step"] == 4


# ----------------------------------------------------------------------------- a real MLflow server
@pytest.fixture
def mlflow_server(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "server.db")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # No job runner (MLflow 3 starts a pool of huey consumers for its GenAI jobs): a store is all we need.
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_rank_run_logs_to_an_mlflow_server_over_http(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the spawned ranks inherit it; it beats tracking.uri
    (out,) = spawn(_jobs, [(_two_rank_sets(tmp_path, f"sqlite:///{tmp_path}/unused.db", "train.max_steps=2"), None)],
                   [])[0]
    assert not (tmp_path / "unused.db").exists()
    client = MlflowClient(mlflow_server)
    mlrun = client.get_run(out["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["world_size"] == "2"
    assert len(client.get_metric_history(out["run_id"], "loss")) == 2
    assert {"run.json", "recipe.yaml", "plots"} <= {a.path for a in client.list_artifacts(out["run_id"])}
    info = read_run_json(tmp_path / "ckpt")
    assert info["mlflow"]["tracking_uri"] == mlflow_server
