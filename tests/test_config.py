import re
from pathlib import Path

import pytest

from scaling.config import RecipeError, flatten, load_recipe
from scaling.plan import BatchPlan, pick_precision, resolve

REPO = Path(__file__).resolve().parents[1]

MODALITIES = ["speech", "vision", "text"]


RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml")
                 if p.parent.name in MODALITIES)
SIZE_RECIPES = [r for r in RECIPES if not r.endswith("tiny.yaml")]


def test_every_modality_has_tiny_base_and_large():
    assert {f"recipes/{m}/{s}.yaml" for m in MODALITIES for s in ("tiny", "base", "large")} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_and_plans(recipe):
    shards = [] if recipe.endswith("tiny.yaml") else ["data.train_shards=synthetic"]
    r = load_recipe(REPO / recipe, shards)
    assert r.model.modality == Path(recipe).parent.name
    for key in ["seed", "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.precision",
                "data.train_shards", "checkpoint.dir", "checkpoint.every_steps", "tracking.uri",
                "tracking.experiment", "engine.name"]:
        assert key in flatten(r)
    plan = resolve(r, 1)
    assert plan.max_steps == r.train.max_steps and plan.lr == r.optim.lr  # at its own batch nothing rescales
    assert resolve(plan.resolved(), 1).resolved() == plan.resolved()  # resolving twice changes nothing
    # The collapse guard can fire inside the run's own length.
    assert r.monitor.after_steps < r.train.max_steps


@pytest.mark.parametrize("recipe", SIZE_RECIPES)
def test_size_recipes_have_no_silent_data_default(recipe):
    with pytest.raises(RecipeError, match=r"'data\.train_shards' is not set: --set data\.train_shards="):
        load_recipe(REPO / recipe)


def test_size_recipes_follow_the_published_shapes():
    # Blocks in all (data2vec 2.0: prenet + main), dim, FFN, heads; ViT-H for the 2.0 image recipes.
    shapes = {"base": (12, 768, 3072, 12), "large": (24, 1024, 4096, 16), "huge": (32, 1280, 5120, 16)}
    for recipe in SIZE_RECIPES:
        m = load_recipe(REPO / recipe, ["data.train_shards=synthetic"]).model
        blocks = m.depth + (m.v2.prenet_depth if m.version == 2 else 0)
        size = Path(recipe).stem.removeprefix("v2-")
        assert (blocks, m.dim, m.ffn_dim, m.heads) == shapes[size], recipe


def test_extends_merges_and_set_overrides(recipe_path):
    r = load_recipe(recipe_path("speech"), ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "model.speech.layerdrop=0.1",
                                           "optim.lr=3e-4"])
    assert r.train.max_steps == 7 and r.optim.betas == [0.8, 0.9] and r.model.speech.layerdrop == 0.1
    assert r.optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; float fields accept it
    assert r.model.dim == 64  # from tiny.yaml
    assert r.ema.anneal_steps == 300 and r.optim.eps == 1e-6  # tiny over base, and inherited from base


def test_base_recipes_follow_reference_v1_tables(recipe_path):
    # docs/data2vec.md §1.2 and docs/recipes.md: K, per-layer norm, loss per modality
    speech, text, vision = (load_recipe(recipe_path(m, "base"), ["data.train_shards=synthetic"])
                            for m in ["speech", "text", "vision"])
    assert (speech.objective.top_k, speech.objective.layer_norm, speech.objective.loss) == (8, "instance", "l2")
    assert (text.objective.top_k, text.objective.layer_norm, text.objective.beta) == (10, "layer", 4.0)
    assert (vision.objective.top_k, vision.objective.tap, vision.objective.post_norm) == (6, "block", "layer")
    assert (speech.ema.decay, speech.ema.end_decay, speech.ema.anneal_steps) == (0.999, 0.9999, 30000)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown key 'train.max_stepz' (did you mean 'train.max_steps'?"),
    ("optim.lr_scaling=cubic", "'optim.lr_scaling' must be one of"),
    ("train.global_batch_seconds=100", "'train.global_batch_seconds' and train.micro_batch_seconds must be set together"),
    ("train.max_steps=ten", "'train.max_steps' must be an integer"),
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("optim.lr=[1]", "'optim.lr' must be a number"),
    ("model.speech.nope=1", "unknown key 'model.speech.nope'"),
    ("objective.top_k=99", "'objective.top_k' must be in 1..model.depth"),
])
def test_bad_override_names_the_key(recipe_path, override, message):
    with pytest.raises(RecipeError, match=re.escape(message)) as e:
        load_recipe(recipe_path("speech"), [override])
    assert "tiny.yaml" in str(e.value)


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: unknown key 'train\.micro_batch'"):
        load_recipe(bad)
    bad.write_text("checkpoint:\n  every_steps: '10'\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: 'checkpoint\.every_steps' must be an integer"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_batch_plan_fits_any_world_size():
    from scaling.config import TrainConfig

    plan = BatchPlan.from_config(TrainConfig(global_batch_size=32, micro_batch_size=4), world_size=2)
    assert (plan.micro_batch_size, plan.accumulation, plan.world_size) == (4, 4, 2)
    # micro_batch_size is an upper bound: 30 over 2 ranks is 15 each = 3 x 5
    plan = BatchPlan.from_config(TrainConfig(global_batch_size=30, micro_batch_size=4), world_size=2)
    assert (plan.micro_batch_size, plan.accumulation) == (3, 5)
    plan = BatchPlan.from_config(TrainConfig(global_batch_size=16, micro_batch_size=16), world_size=2)
    assert (plan.micro_batch_size, plan.accumulation) == (8, 1)
    for world in (1, 2, 3, 4, 6, 8):
        plan = BatchPlan.from_config(TrainConfig(global_batch_size=48, micro_batch_size=5), world_size=world)
        assert plan.micro_batch_size * plan.accumulation * world == 48 and plan.micro_batch_size <= 5
    with pytest.raises(ValueError, match=re.escape(
            "train.global_batch_size (30) must be a multiple of the world size (4): world sizes that divide it: "
            "2, 3, 5, 6; or, on 4 ranks, train.global_batch_size 28 or 32")):
        BatchPlan.from_config(TrainConfig(global_batch_size=30, micro_batch_size=4), world_size=4)


def _vision_base(*overrides):
    return load_recipe(REPO / "recipes/vision/base.yaml", ["data.train_shards=synthetic", *overrides])


@pytest.mark.parametrize("rule, factor", [("linear", 2.0), ("sqrt", 2.0 ** 0.5), ("none", 1.0)])
def test_another_global_batch_keeps_the_samples_and_rescales_the_lr(rule, factor):
    base = _vision_base(f"optim.lr_scaling={rule}")
    plan = resolve(_vision_base(f"optim.lr_scaling={rule}", "train.global_batch_size=4096"), 64)
    assert plan.lr == pytest.approx(base.optim.lr * factor)
    # Step counts are stated at train.reference_batch (2048): twice the batch, half the steps.
    assert plan.max_steps == round(base.train.max_steps / 2)
    assert plan.warmup_steps == round(base.schedule.warmup_steps / 2)
    assert plan.max_steps * 4096 == pytest.approx(base.train.max_steps * 2048, rel=1e-5)
    assert ("optim.lr_scaling is none" in " ".join(plan.notes)) == (rule == "none")
    r = plan.resolved()
    assert (r.train.max_steps, r.optim.lr, r.train.reference_batch) == (plan.max_steps, plan.lr, 4096)
    assert "rule " + rule in "\n".join(plan.lines())


def test_speech_batches_by_seconds_of_audio():
    r = load_recipe(REPO / "recipes/speech/base.yaml", ["data.train_shards=synthetic"])
    sr = r.data.speech.sample_rate
    for world in (1, 8, 16, 64, 100):
        b = resolve(r, world).batch
        share = r.train.global_batch_seconds / world
        # Equal micro-batches within the device's budget that add up to the rank's share.
        assert b.micro_batch_audio_samples <= r.train.micro_batch_seconds * sr
        assert b.accumulation * b.micro_batch_audio_samples == pytest.approx(share * sr, abs=b.accumulation)
        assert b.accumulation == -(-share // r.train.micro_batch_seconds)
    with pytest.raises(ValueError, match=re.escape("gives each of 1024 ranks 3.71 s of audio per step, less than "
                                                   "one crop of data.speech.max_samples (20 s): use at most 190 "
                                                   "ranks, or train.global_batch_seconds >= 20480")):
        resolve(r, 1024)
    with pytest.raises(ValueError, match=r"train\.micro_batch_seconds \(10\) is less than one crop"):
        resolve(load_recipe(REPO / "recipes/speech/base.yaml", ["data.train_shards=synthetic",
                                                               "train.micro_batch_seconds=10"]), 8)


def test_auto_precision_follows_the_machine(monkeypatch):
    import scaling.plan as plan_mod

    assert pick_precision("fp32", "auto") == "fp32" and pick_precision("bf16", "cpu") == "bf16"
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(plan_mod, "cpu_has_bf16", lambda: has_bf16)
        assert pick_precision("auto", "cpu") == expected


def test_extends_list_merges_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {max_steps: 5, log_every: 2}\ndata: {train_shards: synthetic}\n")
    (tmp_path / "b.yaml").write_text("train: {max_steps: 7}\n")
    (tmp_path / "run.yaml").write_text("extends: [a.yaml, b.yaml]\ntrain: {micro_batch_size: 4}\n")
    r = load_recipe(tmp_path / "run.yaml")
    assert (r.train.max_steps, r.train.log_every, r.train.micro_batch_size) == (7, 2, 4)
    (tmp_path / "bad.yaml").write_text("extends: {a: 1}\n")
    with pytest.raises(RecipeError, match="'extends' must be a file name or a list of them"):
        load_recipe(tmp_path / "bad.yaml")
