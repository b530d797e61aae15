"""scaling.checkpoint: every engine's checkpoint read back offline, consolidated bit for bit, refusing
planted code on every read path, never replacing good state with bad, and resume mismatches.
The engines' checkpoints come from conftest's ``engine_checkpoints`` (made once per session)."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_harness import ENGINES, REPO, engine_overrides, free_port
from scaling.checkpoint import CheckpointError, read_meta, read_state_dict, resolve
from scaling.checkpoint.consolidate import consolidate
from scaling.config import load_recipe
from scaling.convert import to_hf
from scaling.pretrain import main as pretrain_main
from scaling.pretrain import run
from scaling.trainer import DivergenceError
from scaling.probe import load_student

# ----------------------------------------------------------------------------- reading and consolidating
@pytest.mark.parametrize("name", list(ENGINES))
def test_consolidate_equals_the_live_gathered_state(engine_checkpoints, name, tmp_path):
    ckpt_dir, live = engine_checkpoints[name]
    assert read_meta(resolve(ckpt_dir))["engine"] == ENGINES[name][1][0].split("=")[1]
    out = tmp_path / "both.safetensors"
    info = consolidate(ckpt_dir, out, part="both")
    with safe_open(str(out), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["scaling.part"] == "both"
    assert got.keys() == live.keys() and info["tensors"] == len(live)
    assert any(k.startswith("teacher.") for k in got) and any(k.startswith("student.") for k in got)
    for k, v in live.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k  # bit for bit
    # one part, converted: each tensor is the live one cast, under the part's own names
    consolidate(ckpt_dir, tmp_path / "teacher.safetensors", part="teacher", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "teacher.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(k[len("teacher."):] for k in live if k.startswith("teacher."))
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), live[f"teacher.{k}"].to(torch.bfloat16)), k
    # the probe's student is the same tensors, and it differs from its initial weights (it trained)
    model, _ = load_student(ckpt_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[f"student.{k}"].float()), k


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_deepspeed_student_equals_deepspeeds_own_consolidation(engine_checkpoints, name):
    """Our ZeRO reader against DeepSpeed's zero_to_fp32 (trusted files here, so its unsafe load is fine)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = resolve(engine_checkpoints[name][0])
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    ours = read_state_dict(ckpt, "student")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k


# ----------------------------------------------------------------------------- untrusted input
class _Payload:
    """Unpickling this creates ``marker``: it stands for any code a planted pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


NEVER_READ = {"COMPLETE", "zero_to_fp32.py", "zero_to_torch.py"}  # never opened by any reader, never executed


def _plant(ckpt: Path, rel: str, marker: Path) -> None:
    """Replace one file of a checkpoint with a payload and, as an attacker who can write there would,
    record the new size in meta.json so that the size check does not catch it first."""
    path = ckpt / rel
    if path.suffix == ".pt" or path.suffix == ".distcp":
        torch.save(_Payload(marker), path)  # torch's zip format, the payload in its data.pkl
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    if rel != "meta.json":
        meta = json.loads((ckpt / "meta.json").read_text())
        if rel in meta["files"]:
            meta["files"][rel] = path.stat().st_size
        (ckpt / "meta.json").write_text(json.dumps(meta))


def _entry_points(name: str, ckpt: Path, tmp: Path) -> dict:
    modality = ENGINES[name][0]

    def resume():  # the rerun of the same command one step longer, pointed at this checkpoint (one rank)
        over = engine_overrides(tmp, name) + [f"checkpoint.resume={ckpt}", f"checkpoint.dir={tmp}/resumed",
                                              "train.max_steps=3"]  # at max_steps it would read nothing
        run(load_recipe(REPO / "recipes" / modality / "tiny.yaml", over))

    return {"resume": resume, "probe": lambda: load_student(ckpt),
            "consolidate": lambda: consolidate(ckpt, tmp / "out.safetensors", part="both"),
            "to-hf": lambda: to_hf(ckpt, tmp / "hf")}


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """Positive control: the planted files really run code when read the way DCP (.metadata) and
    DeepSpeed (.pt) read them by default."""
    marker = tmp_path / "marker"
    for plant in (lambda p: p.write_bytes(pickle.dumps(_Payload(marker))), lambda p: torch.save(_Payload(marker), p)):
        plant(tmp_path / "file")
        if (tmp_path / "file").read_bytes()[:2] == b"PK":  # torch's zip format
            torch.load(tmp_path / "file", weights_only=False)
        else:
            pickle.loads((tmp_path / "file").read_bytes())
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("name", list(ENGINES))
def test_planted_code_is_refused_on_every_read_path(engine_checkpoints, name, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # an in-process fsdp resume joins a 1-rank group
    original = resolve(engine_checkpoints[name][0])
    files = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
    assert {"meta.json", "recipe.yaml", "train_state_rank0.pt", "train_state_rank1.pt" if name != "single" else
            "optimizer.pt"} <= set(files)
    refused = 0
    for rel in files:
        ckpt = tmp_path / rel.replace("/", "_") / original.name
        shutil.copytree(original, ckpt)
        marker = tmp_path / f"marker-{rel.replace('/', '_')}"
        _plant(ckpt, rel, marker)
        for entry, call in _entry_points(name, ckpt, tmp_path / "work").items():
            try:
                call()
                error = None
            except ValueError as exn:
                error = str(exn)
            assert not marker.exists(), f"{name}: planted {rel} ran on {entry}"
            if Path(rel).name not in NEVER_READ:
                assert error is not None and str(ckpt / rel) in error, f"{name} {rel} {entry}: {error}"
                assert "\n" not in error
                refused += 1
    assert refused >= 4 * (len(files) - len(NEVER_READ & {Path(f).name for f in files}))


# ----------------------------------------------------------------------------- never replace good state with bad
def _vision(tmp_path: Path, *extra: str):
    return load_recipe(REPO / "recipes/vision/tiny.yaml", [
        "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8", "tracking.enabled=false",
        f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.every_steps=2", "checkpoint.keep_last=1", *extra])


def test_a_diverged_run_stops_with_its_last_finite_state(tmp_path):
    # lr 1e6, no warmup, no clipping: step 1 is finite, every forward after it overflows. The non-finite
    # steps are skipped (no NaN reaches the weights, the optimizer or the teacher); 3 in a row stop the run
    # with a checkpoint of step 1's weights.
    with pytest.raises(DivergenceError, match=r"step 4: 3 consecutive steps \(2-4\) had a non-finite loss or "
                                              r"gradient norm .* \(the weights of step 1, the last good one\)"):
        run(_vision(tmp_path, "train.max_steps=8", "optim.lr=1e6", "optim.grad_clip=0", "schedule.warmup_steps=0",
                    "checkpoint.every_steps=1", "train.max_skipped_steps=3"))
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in read_state_dict(tmp_path / "ckpt", part).values())


@pytest.mark.parametrize("damage", ["half a file", "cut meta.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    run(_vision(tmp_path, "train.max_steps=4", "checkpoint.keep_last=2"))
    newest = tmp_path / "ckpt" / "step_00000004"
    victim = newest / ("model.safetensors" if damage == "half a file" else "meta.json")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # named directly, the damaged checkpoint is an error, never silently swapped
    with pytest.raises(CheckpointError, match=str(victim)):
        load_student(newest)
    with caplog.at_level(logging.WARNING, logger="scaling.checkpoint"):
        resumed = run(_vision(tmp_path, "train.max_steps=6", "checkpoint.keep_last=2"))
    assert resumed.start_step == 2 and resumed.step == 6
    assert any(str(victim) in r.getMessage() and "step_00000004" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- resume mismatches
@pytest.mark.parametrize("change, expected", [
    (["engine.name=fsdp"], r"was written by engine single \(full files\); engine.name=fsdp cannot resume it"),
    (["model.dim=32", "model.heads=2"], r"holds another model: model.dim 64 -> 32; model.heads 4 -> 2"),
])
def test_a_resume_that_cannot_work_is_one_line_before_anything_starts(tmp_path, change, expected, capsys):
    run(_vision(tmp_path, "train.max_steps=2"))
    capsys.readouterr()
    args = [str(REPO / "recipes/vision/tiny.yaml")] + sum([["--set", s] for s in [
        "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8", "train.max_steps=4",
        f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", *change]], [])
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scaling-pretrain: error: ") and re.search(expected, err[0]), err
    assert not (tmp_path / "mlruns.db").exists() and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["run.json", "step_00000002"]


def test_deepspeed_resume_on_another_stage_or_world_is_refused(engine_checkpoints):
    ckpt = resolve(engine_checkpoints["zero3"][0])
    recipe = load_recipe(REPO / "recipes/vision/tiny.yaml", engine_overrides(ckpt.parent.parent, "zero3"))
    from scaling.checkpoint import check_resume

    with pytest.raises(CheckpointError, match="written by 2 ranks; DeepSpeed resumes only on 2 ranks"):
        check_resume(ckpt, recipe, world_size=1, checkpoint_format="deepspeed")
    recipe.engine.zero_stage = 2
    with pytest.raises(CheckpointError, match="written by ZeRO-3; this run is ZeRO-2"):
        check_resume(ckpt, recipe, world_size=2, checkpoint_format="deepspeed")


def test_a_changed_max_steps_or_dropout_resumes_with_a_warning_logged_to_mlflow(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    first = run(_vision(tmp_path, "train.max_steps=2", "tracking.enabled=true", f"tracking.uri={uri}"))
    with caplog.at_level(logging.WARNING, logger="scaling"):
        resumed = run(_vision(tmp_path, "train.max_steps=4", "tracking.enabled=true", f"tracking.uri={uri}",
                              "model.dropout=0.1"))
    assert resumed.start_step == 2 and resumed.mlflow_run_id == first.mlflow_run_id
    messages = ["train.max_steps changed from 2 (in step_00000002) to 4", "model.dropout 0.0 -> 0.1"]
    tags = MlflowClient(uri).get_run(resumed.mlflow_run_id).data.tags
    for message in messages:
        assert any(message in r.getMessage() for r in caplog.records)
        assert message in tags["warning.resume_step_2"]
