import pytest

from scaling.config import RecipeError, flatten, load_recipe
from scaling.plan import BatchPlan

MODALITIES = ["speech", "vision", "text"]


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", ["tiny", "base"])
def test_every_recipe_loads(recipe_path, modality, size):
    r = load_recipe(recipe_path(modality, size))
    assert r.model.modality == modality
    for key in ["seed", "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.precision",
                "data.train_shards", "checkpoint.dir", "checkpoint.every_steps", "tracking.uri",
                "tracking.experiment", "engine.name"]:
        assert key in flatten(r)


def test_extends_merges_and_set_overrides(recipe_path):
    r = load_recipe(recipe_path("speech"), ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "model.speech.layerdrop=0.1",
                                           "optim.lr=3e-4"])
    assert r.train.max_steps == 7 and r.optim.betas == [0.8, 0.9] and r.model.speech.layerdrop == 0.1
    assert r.optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; float fields accept it
    assert r.model.dim == 64  # from tiny.yaml
    assert r.ema.anneal_steps == 300 and r.optim.eps == 1e-6  # tiny over base, and inherited from base


def test_base_recipes_follow_reference_v1_tables(recipe_path):
    # reference §1.2 / §4.1: K, per-layer norm, loss per modality
    speech, text, vision = (load_recipe(recipe_path(m, "base")) for m in ["speech", "text", "vision"])
    assert (speech.objective.top_k, speech.objective.layer_norm, speech.objective.loss) == (8, "instance", "l2")
    assert (text.objective.top_k, text.objective.layer_norm, text.objective.beta) == (10, "layer", 4.0)
    assert (vision.objective.top_k, vision.objective.tap, vision.objective.post_norm) == (6, "block", "layer")
    assert (speech.ema.decay, speech.ema.end_decay, speech.ema.anneal_steps) == (0.999, 0.9999, 30000)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown key 'train.max_stepz'"),
    ("train.max_steps=ten", "'train.max_steps' must be an integer"),
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("optim.lr=[1]", "'optim.lr' must be a number"),
    ("model.speech.nope=1", "unknown key 'model.speech.nope'"),
    ("objective.top_k=99", "'objective.top_k' must be in 1..model.depth"),
])
def test_bad_override_names_the_key(recipe_path, override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace(".", r"\.")) as e:
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
    with pytest.raises(ValueError, match=r"global_batch_size \(30\) must be a multiple of the world size \(4\)"):
        BatchPlan.from_config(TrainConfig(global_batch_size=30, micro_batch_size=4), world_size=4)
