"""scaling-convert on real checkpoints of every engine: to-hf takes the right weights from each
format, from-hf then to-hf is the identity, and model.init_from starts a run from HF weights (first
loss against an independent computation on transformers' model) or from any engine's checkpoint.
(The adapters' layer-by-layer equality with transformers: tests/test_hf.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dist_harness import ENGINES, REPO, engine_overrides
from scaling.checkpoint import CheckpointError, check_resume
from scaling.config import load_recipe
from scaling.convert import from_hf, main, to_hf
from scaling.data.build import train_tokenizer
from scaling.hf import ADAPTERS
from scaling.pretrain import run


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    words = ["data", "vector", "teacher", "student", "mask", "shard", "token", "layer", "norm", "batch"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    return train_tokenizer(lines, str(tmp_path_factory.mktemp("spm") / "sp"), 60)


def _hf_tensors(out) -> dict:
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", list(ENGINES))
@pytest.mark.parametrize("part", ["student", "teacher"])
def test_to_hf_takes_the_part_from_every_engine(engine_checkpoints, name, part, tmp_path, tokenizer):
    from transformers import AutoModel

    ckpt, live = engine_checkpoints[name]
    modality = ENGINES[name][0]
    out = to_hf(ckpt, tmp_path / "hf", part=part, tokenizer=tokenizer if modality == "text" else None)
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == {"speech": "Data2VecAudioModel", "vision": "Data2VecVisionModel",
                                    "text": "Data2VecTextModel"}[modality]
    state = {k[len("student."):]: v.float() for k, v in live.items() if k.startswith("student.")}
    if part == "teacher":  # the EMA encoder in place of the student's, the shared parts from the student
        state.update({k[len("teacher."):]: v for k, v in live.items() if k.startswith("teacher.")})
    recipe = load_recipe(REPO / "recipes" / modality / "tiny.yaml", engine_overrides(tmp_path, name))
    expected = ADAPTERS[modality].to_hf(state, recipe)
    got = _hf_tensors(out)
    assert expected and set(expected) <= set(got)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_from_hf_then_to_hf_returns_identical_tensors(engine_checkpoints, tmp_path):
    first = to_hf(engine_checkpoints["fsdp"][0], tmp_path / "hf1")
    ckpt = from_hf(first, tmp_path / "from-hf", recipe=REPO / "recipes/vision/tiny.yaml")
    second = to_hf(ckpt, tmp_path / "hf2")
    a, b = _hf_tensors(first), _hf_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert config[0] == config[1]
    # the weights-only checkpoint is no resume point, and says what to do instead
    recipe = load_recipe(REPO / "recipes/vision/tiny.yaml")
    with pytest.raises(CheckpointError, match=r"holds weights only .* --set model.init_from="):
        check_resume(ckpt, recipe, world_size=1, checkpoint_format="full")


def _vision_run(tmp_path, *extra):
    return load_recipe(REPO / "recipes/vision/tiny.yaml", [
        "train.precision=fp32", "train.global_batch_size=8", "train.micro_batch_size=8", "tracking.enabled=false",
        "train.max_steps=1", "checkpoint.every_steps=100", f"checkpoint.dir={tmp_path}/run", *extra])


def test_init_from_hf_gives_the_first_loss_computed_on_the_hf_model(engine_checkpoints, tmp_path):
    """The run's step-1 loss against the same loss computed independently: the teacher's targets from
    transformers' Data2VecVisionModel hidden states on the clean image, the student's prediction from
    the same model with transformers' own mask-token path, and the run's freshly initialised head."""
    from transformers import Data2VecVisionModel

    from scaling.data import build_loader
    from scaling.models import build_model
    from scaling.objective import make_targets, regression_loss

    hf_dir = to_hf(engine_checkpoints["single"][0], tmp_path / "hf")
    recipe = _vision_run(tmp_path, f"model.init_from={hf_dir}")
    got = run(recipe).history[0]

    hf = Data2VecVisionModel.from_pretrained(hf_dir).eval()
    batch = next(build_loader(recipe.data, recipe.model, recipe.masking, seed=recipe.seed, rank=0, world_size=1,
                              micro_batch_size=8))
    torch.manual_seed(recipe.seed)
    head = build_model(recipe.model).head  # what the run initialised before loading the HF weights
    mask = batch["mask_BT"].bool()
    with torch.no_grad():
        clean = hf(pixel_values=batch["image_BCHW"], output_hidden_states=True)
        taps = [h[:, 1:] for h in clean.hidden_states[-recipe.objective.top_k:]]  # block outputs, CLS dropped
        target = make_targets(taps, recipe.objective, None)[mask]
        masked = hf(pixel_values=batch["image_BCHW"], bool_masked_pos=mask)
        pred = head.proj(masked.last_hidden_state[:, 1:][mask])  # HF's final layernorm is our head.norm
        loss = regression_loss(pred, target, recipe.objective) / mask.sum()
    assert got.num_masked == int(mask.sum())
    assert got.loss == pytest.approx(float(loss), rel=1e-5)


def test_init_from_a_sharded_checkpoint_starts_student_and_teacher_from_it(engine_checkpoints, tmp_path):
    ckpt, live = engine_checkpoints["zero3"]  # another engine's format, read by the single engine
    recipe = _vision_run(tmp_path, f"model.init_from={ckpt}", "optim.lr=0", "ema.decay=1", "ema.end_decay=1")
    state = run(recipe, gather_state=True).full_state  # lr 0 and a frozen teacher: step 1 changes nothing
    assert state.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(state[k], v.float()), k


def test_init_from_another_model_is_one_line(engine_checkpoints, tmp_path, capsys):
    from scaling.pretrain import main as pretrain_main

    ckpt = engine_checkpoints["single"][0]
    code = pretrain_main([str(REPO / "recipes/vision/tiny.yaml"), "--set", f"model.init_from={ckpt}",
                          "--set", "model.ffn_dim=96", "--set", f"checkpoint.dir={tmp_path}/run",
                          "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"model.init_from={ckpt}: its model differs from the recipe's (weights -> recipe): model.ffn_dim 128 -> 96" \
        in err[0]
    assert not (tmp_path / "run").exists()


def test_cli(engine_checkpoints, tmp_path, capsys):
    ckpt, live = engine_checkpoints["zero2"]
    assert main(["consolidate", str(ckpt), str(tmp_path / "s.safetensors"), "--dtype", "bf16"]) == 0
    assert "-> " in capsys.readouterr().out
    student = {k[len("student."):]: v for k, v in live.items() if k.startswith("student.")}
    got = load_file(tmp_path / "s.safetensors")
    assert got.keys() == student.keys() and all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in student.items())
    assert main(["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"scaling-convert: error: {tmp_path / 'nowhere'}: no such checkpoint or checkpoint.dir"]
