"""scaling-probe: the classifiers on synthetic features, the end-to-end probe of a tiny vision run.
(Reading the student back from every engine's checkpoint format: tests/test_checkpoint.py.)"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dist_harness import REPO
from scaling.config import load_recipe
from scaling.data import encode_vision_sample, write_shards
from scaling.probe import (
    chance_levels,
    extract_features,
    knn_accuracy,
    linear_probe,
    load_student,
    main,
    probe,
)
from scaling.checkpoint import resolve

VISION_TINY = REPO / "recipes" / "vision" / "tiny.yaml"


# ----------------------------------------------------------------------------- classifiers
def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int, spread: float = 1.0):
    """Gaussian blobs around fixed well-separated centres (same centres for every seed)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3.0
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x * 5.0 + 100.0, y + 3  # an offset and a scale (standardisation) and labels that don't start at 0


def test_separable_blobs_reach_high_accuracy():
    xtr, ytr = _blobs(100, 4, 16, seed=0)
    xte, yte = _blobs(100, 4, 16, seed=1)
    lin = linear_probe(xtr, ytr, xte, yte)
    assert lin["acc"] >= 0.95 and lin["train_acc"] >= 0.95, lin
    assert knn_accuracy(xtr, ytr, xte, yte, k=20) >= 0.95


def test_shuffled_labels_stay_near_chance():
    xtr, ytr = _blobs(250, 4, 16, seed=0)
    xte, yte = _blobs(250, 4, 16, seed=1)
    g = torch.Generator().manual_seed(7)
    ytr, yte = ytr[torch.randperm(len(ytr), generator=g)], yte[torch.randperm(len(yte), generator=g)]
    chance, majority = chance_levels(ytr, yte)
    assert chance == 0.25 and majority == pytest.approx(0.25)
    lin = linear_probe(xtr, ytr, xte, yte)
    knn = knn_accuracy(xtr, ytr, xte, yte, k=20)
    # 1000 test samples: the std of a chance-level accuracy is about 0.014
    assert abs(lin["acc"] - chance) < 0.07, lin
    assert abs(knn - chance) < 0.07, knn


def test_knn_vote_and_unseen_classes():
    xtr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ytr = torch.tensor([0, 0, 1, 1])
    xte = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.05, 1.0]])
    yte = torch.tensor([0, 1, 5])  # class 5 is never in train: always an error
    assert knn_accuracy(xtr, ytr, xte, yte, k=1) == pytest.approx(2 / 3)
    assert knn_accuracy(xtr, ytr, xte, yte, k=100) <= 1.0  # k is capped at the train size
    with pytest.raises(ValueError, match="at least 2"):
        linear_probe(xtr, torch.zeros(4, dtype=torch.long), xte, yte)


# ----------------------------------------------------------------------------- end to end (single engine)
def _stripes(n: int, seed: int, unlabelled: int = 0):
    """Class 0: horizontal stripes, class 1: vertical stripes (random phase, noise), 28x28 grayscale;
    then ``unlabelled`` samples without a label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for i in range(n + unlabelled):
        c = i % 2
        coord = yy if c == 0 else xx
        img = np.where(((coord + rng.integers(0, 4)) // 2) % 2 == 0, 200, 40) + rng.normal(0, 20, (28, 28))
        img = np.clip(img, 0, 255).astype(np.uint8)[None]
        yield encode_vision_sample(f"s{seed}x{i:05d}", img, label=c if i < n else None)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    from scaling.pretrain import run

    tmp = tmp_path_factory.mktemp("probe")
    train = write_shards(str(tmp / "data"), _stripes(96, 0, unlabelled=5), prefix="train", samples_per_shard=40)
    test = write_shards(str(tmp / "data"), _stripes(48, 1), prefix="test", samples_per_shard=48)
    overrides = ["train.max_steps=3", "train.precision=fp32", f"checkpoint.dir={tmp}/ckpt", "checkpoint.every_steps=2",
                 "tracking.enabled=false", f"data.train_shards={train}", "train.global_batch_size=8",
                 "train.micro_batch_size=8", "schedule.warmup_steps=1"]
    result = run(load_recipe(VISION_TINY, overrides))
    assert result.checkpoint.name == "step_00000003"
    return {"tmp": tmp, "train": train, "test": test, "ckpt_dir": tmp / "ckpt"}


def test_checkpoint_dir_resolves_to_newest(vision_run):
    ckpt_dir = vision_run["ckpt_dir"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["run.json", "step_00000002", "step_00000003"]
    assert resolve(ckpt_dir).name == "step_00000003"
    assert resolve(ckpt_dir / "step_00000002").name == "step_00000002"
    model, recipe = load_student(ckpt_dir)
    from safetensors.torch import load_file

    stored = load_file(ckpt_dir / "step_00000003" / "model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, stored[f"student.{k}"], rtol=0, atol=0, msg=k)
    assert recipe.model.modality == "vision" and not model.training


def test_missing_or_incomplete_checkpoint_is_a_clear_error(tmp_path, vision_run):
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        load_student(tmp_path / "nope")
    (tmp_path / "empty" / "step_00000005").mkdir(parents=True)  # no COMPLETE marker
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        load_student(tmp_path / "empty")
    odd = tmp_path / "odd" / "step_00000001"
    odd.mkdir(parents=True)
    src = vision_run["ckpt_dir"] / "step_00000003"
    for name in ("COMPLETE", "meta.json", "recipe.yaml"):
        (odd / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ValueError, match="model.safetensors: missing"):
        load_student(tmp_path / "odd")
    assert main([str(tmp_path / "nope"), "--train", vision_run["train"], "--test", vision_run["test"],
                 "--no-tracking"]) == 2


def test_probe_checkpoint_and_random_init(vision_run, capsys):
    trained = probe(vision_run["ckpt_dir"], vision_run["train"], vision_run["test"])
    baseline = probe(vision_run["ckpt_dir"], vision_run["train"], vision_run["test"], random_init=True)
    for res in (trained, baseline):
        assert 0.0 <= res["linear_acc"] <= 1.0 and 0.0 <= res["knn_acc"] <= 1.0, res
        # exactly one epoch, unlabelled samples skipped
        assert (res["num_train"], res["num_test"], res["num_classes"], res["feature_dim"]) == (96, 48, 2, 64)
        assert res["chance"] == 0.5 and res["step"] == 3 and res["mlflow_run_id"] is None
    assert trained["prefix"] == "probe" and baseline["prefix"] == "probe_random"
    out = capsys.readouterr().out
    for line in ("probe/linear_acc", "probe/knn_acc", "probe_random/linear_acc", "probe_random/knn_acc", "chance"):
        assert f"[probe] {line}" in out, out


def test_layers_and_random_init_weights(vision_run):
    from scaling.probe import random_student

    model, recipe = load_student(vision_run["ckpt_dir"])
    final, y = extract_features(model, recipe, vision_run["test"])
    last_block, y2 = extract_features(model, recipe, vision_run["test"], layer=recipe.model.depth - 1)
    torch.testing.assert_close(final, last_block)  # tap=block: the last block's output is the final output
    assert torch.equal(y, y2) and final.shape == (48, 64)
    first, _ = extract_features(model, recipe, vision_run["test"], layer=-recipe.model.depth, tap="ffn",
                                batch_size=5, max_samples=7)
    assert first.shape == (7, 64) and not torch.allclose(first, final[:7])
    with pytest.raises(ValueError, match="out of range"):
        extract_features(model, recipe, vision_run["test"], layer=recipe.model.depth)
    # the random init is the run's own starting point (pretraining seeds with recipe.seed)
    rand = random_student(recipe).state_dict()
    torch.manual_seed(recipe.seed)
    from scaling.models import build_model

    for k, v in build_model(recipe.model).state_dict().items():
        torch.testing.assert_close(rand[k], v, rtol=0, atol=0, msg=k)


def test_cli_logs_to_mlflow(vision_run, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    assert main([str(vision_run["ckpt_dir"]), "--train", vision_run["train"], "--test", vision_run["test"],
                 "--random-init", "--tracking-uri", uri, "--experiment", "probe-test", "-k", "5"]) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("probe-test").experiment_id])
    metrics = run.data.metrics
    assert {"probe_random/linear_acc", "probe_random/knn_acc"} <= set(metrics)
    assert 0 <= metrics["probe_random/knn_acc"] <= 1
    assert run.data.params["random_init"] == "True" and run.data.params["k"] == "5"
    assert client.get_metric_history(run.info.run_id, "probe_random/linear_acc")[0].step == 3


# ----------------------------------------------------------------------------- padding (speech, text)
def _speech_clips(n: int):
    rng = np.random.default_rng(0)
    from scaling.data import encode_speech_sample

    for i in range(n):
        t = np.arange(int(rng.integers(8000, 30000))) / 16000  # 0.5-1.9 s: padded in a batch, some cropped
        audio = 0.5 * np.sin(2 * np.pi * (300 if i % 2 else 2000) * t) + 0.05 * rng.standard_normal(t.shape[0])
        yield encode_speech_sample(f"a{i}", audio.astype(np.float32), 16000, label=i % 2)


def _documents(n: int):
    rng = np.random.default_rng(0)
    from scaling.data import encode_text_sample

    for i in range(n):
        yield encode_text_sample(f"d{i}", rng.integers(10, 1000, int(rng.integers(5, 300))), label=i % 3)


@pytest.mark.parametrize("modality, samples, count", [("speech", _speech_clips, 12), ("text", _documents, 20)])
def test_padded_batches_give_the_unbatched_features(tmp_path, modality, samples, count):
    from scaling.probe import random_student

    shards = write_shards(str(tmp_path), samples(count), prefix=modality)
    recipe = load_recipe(REPO / "recipes" / modality / "tiny.yaml")
    model = random_student(recipe)
    for layer in (-1, 1):
        batched, y = extract_features(model, recipe, shards, layer=layer, batch_size=8)
        one, y1 = extract_features(model, recipe, shards, layer=layer, batch_size=1)
        # one epoch exactly, one row per sample: the 20 documents (5-299 tokens) are 44 blocks of <= 126 tokens
        assert batched.shape == (count, 64) and torch.equal(y, y1)
        torch.testing.assert_close(batched, one, rtol=0, atol=1e-5)


def test_a_long_document_is_one_sample_pooled_over_all_its_tokens(tmp_path):
    from scaling.data import encode_text_sample
    from scaling.probe import random_student

    recipe = load_recipe(REPO / "recipes" / "text" / "tiny.yaml")
    model = random_student(recipe)
    ids = np.random.default_rng(0).integers(10, 1000, 200)  # blocks [BOS + 126 + EOS] and [BOS + 74 + EOS]
    whole = write_shards(str(tmp_path), [encode_text_sample("doc", ids, label=2)], prefix="whole")
    parts = write_shards(str(tmp_path), [encode_text_sample("a", ids[:126], label=0),
                                         encode_text_sample("b", ids[126:], label=1)], prefix="parts")
    x, y = extract_features(model, recipe, whole)
    xp, yp = extract_features(model, recipe, parts)
    assert x.shape == (1, 64) and y.tolist() == [2] and yp.tolist() == [0, 1]
    torch.testing.assert_close(x[0], (128 * xp[0] + 76 * xp[1]) / 204, rtol=0, atol=1e-5)
