"""Recipe validation: every numeric key has a range, NaN/inf never pass, and each bad value is one
RecipeError naming the key and the recipe file (or --set) before anything is built; the batch plan
says when the micro-batch it picks is much smaller than train.micro_batch_size asked."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path

import pytest

from scaling.config import Recipe, RecipeError, TrainConfig, load_recipe, recipe_from_dict
from scaling.plan import BatchPlan, resolve

REPO = Path(__file__).resolve().parents[1]


def _tiny(modality: str) -> Path:
    return REPO / "recipes" / modality / "tiny.yaml"


def _refused(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, list(overrides))
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path} (with --set {' '.join(overrides)}): "), message  # the file and the --set
    return message


# (recipe, override, key the message names); the first block is the list, as found on main.
BAD = [
    ("speech", "optim.lr=.nan", "optim.lr"),
    ("speech", "optim.lr=.inf", "optim.lr"),
    ("speech", "train.log_every=0", "train.log_every"),  # was a ZeroDivisionError after step 1
    ("speech", "data.num_workers=-1", "data.num_workers"),
    ("speech", "optim.eps=0", "optim.eps"),
    ("speech", "data.max_bad_fraction=-1", "data.max_bad_fraction"),
    ("speech", "checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("speech", "model.heads=0", "model.heads"),  # was a ZeroDivisionError inside validate
    ("vision", "model.vision.patch_size=0", "model.vision.patch_size"),  # likewise
    ("vision-v2", "model.v2.decoder_groups=0", "model.v2.decoder_groups"),  # likewise (decoder_dim % groups)
    ("speech", "optim.lr=-1e-4", "optim.lr"),
    ("speech", "optim.betas=[0.9, 1.0]", "optim.betas[1]"),
    ("speech", "optim.weight_decay=-0.1", "optim.weight_decay"),
    ("speech", "model.dropout=1.0", "model.dropout"),
    ("speech", "model.speech.layerdrop=-0.5", "model.speech.layerdrop"),
    ("speech", "model.speech.conv_layers=[[32, 10, 0]]", "model.speech.conv_layers[0][2]"),
    ("speech", "model.speech.conv_layers=[[32, 10]]", "model.speech.conv_layers"),
    ("speech", "model.speech.conv_pos_depth=0", "model.speech.conv_pos_depth"),  # width // depth
    ("speech", "model.layer_norm_eps=0", "model.layer_norm_eps"),
    ("speech", "seed=-1", "seed"),
    ("speech", "seed=4294967296", "seed"),  # numpy seeds are 32-bit
    ("speech", "ema.decay=1.5", "ema.decay"),
    ("speech", "schedule.final_lr_scale=0", "schedule.final_lr_scale"),  # tri_stage takes its log
    ("speech", "schedule.phase_ratio=[-0.1, 1.0, 0.1]", "schedule.phase_ratio[0]"),
    ("speech", "objective.loss_scale=0", "objective.loss_scale"),
    ("speech", "objective.top_k=0", "objective.top_k"),
    ("speech", "train.micro_batch_size=-1", "train.micro_batch_size"),
    ("speech", "train.micro_batch_size=0", "train.micro_batch_size"),  # no bound only for seconds of audio
    ("speech", "train.global_batch_size=0", "train.global_batch_size"),
    ("speech", "train.max_steps=0", "train.max_steps"),
    ("speech", "train.reference_batch=-8", "train.reference_batch"),
    ("speech", "checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("speech", "data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("speech", "data.max_sample_bytes=0", "data.max_sample_bytes"),
    ("speech", "data.bad_check_min_samples=-1", "data.bad_check_min_samples"),
    ("speech", "data.speech.min_samples=999999", "data.speech.min_samples"),  # above max_samples
    ("speech", "masking.speech.length=0", "masking.speech.length"),
    ("speech", "masking.clones=0", "masking.clones"),
    ("speech", "monitor.min_target_rank=-1", "monitor.min_target_rank"),
    ("speech", "tracking.system_metrics_every_s=-5", "tracking.system_metrics_every_s"),
    ("speech", "engine.replicas=0", "engine.replicas"),
    ("speech", "engine.zero_stage=4", "engine.zero_stage"),
    ("vision", "masking.vision.min_aspect=0", "masking.vision.min_aspect"),  # log(min_aspect)
    ("vision", "model.vision.drop_path=1", "model.vision.drop_path"),
    ("vision", "data.vision.std=[0.2, 0.0, 0.2]", "data.vision.std[1]"),  # divides the image
    ("vision", "data.vision.crop_scale=[0.9, 0.1]", "data.vision.crop_scale"),
    ("vision-v2", "masking.vision_v2.block=0", "masking.vision_v2.block"),
    ("text", "data.text.block_size=2", "data.text.block_size"),  # BOS + EOS leave no token
    ("text", "data.text.block_size=4096", "data.text.block_size"),  # above model.text.max_positions
    ("text", "model.text.pad_id=100000", "model.text.pad_id"),  # beyond the vocabulary
    ("text", ("masking.text.leave_unmasked_prob=0.5", "masking.text.random_token_prob=0.7"),
     "masking.text.leave_unmasked_prob"),  # 0.5 + 0.7 of the masked tokens
]
RECIPE_OF = {"speech": _tiny("speech"), "vision": _tiny("vision"), "text": _tiny("text"),
             "vision-v2": REPO / "recipes/vision/v2-tiny.yaml"}


@pytest.mark.parametrize("recipe, overrides, key", BAD, ids=[str(b[1]) for b in BAD])
def test_a_bad_value_is_a_recipe_error_naming_the_key(recipe, overrides, key):
    overrides = (overrides,) if isinstance(overrides, str) else overrides
    message = _refused(RECIPE_OF[recipe], *overrides)
    assert f": '{key}' " in message, message


FLOAT_KEYS = ["optim.lr", "optim.weight_decay", "model.dropout", "ema.end_decay", "train.reference_batch",
              "masking.vision_v2.adjust", "objective.loss_scale", "tracking.system_metrics_every_s"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_nan_and_inf_are_refused_for_float_keys(key, value):
    # masking.vision_v2.adjust has no bounds: only finiteness refuses it. "nan" and "1e999" come in as
    # strings that float() reads (the YAML 1.1 path for `3e-4`).
    message = _refused(_tiny("speech"), f"{key}={value}")
    assert f"'{key}' must be a finite number, got " in message, message


def test_nan_in_a_list_of_floats_names_the_item(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(_tiny("vision")) + "\ndata:\n  vision:\n    mean: [0.5, .nan, 0.5]\n")
    with pytest.raises(RecipeError, match=re.escape(f"{bad}: 'data.vision.mean[1]' must be a finite number, got nan")):
        load_recipe(bad)


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text(f"extends: {_tiny('speech')}\ntrain:\n  log_every: 0\n")
    with pytest.raises(RecipeError, match=re.escape(f"{bad}: 'train.log_every' must be >= 1, got 0")):
        load_recipe(bad)


# "Off" values the code gives a meaning to stay accepted (each read where the key is used).
ACCEPTED = [
    ("data.num_workers=0", "data.num_workers", 0),  # load in the training process
    ("checkpoint.keep_last=0", "checkpoint.keep_last", 0),  # keep every checkpoint
    ("optim.lr=0", "optim.lr", 0.0),  # a frozen step (tests/test_convert.py)
    ("optim.grad_clip=0", "optim.grad_clip", 0.0),  # no clipping
    ("data.shuffle_buffer=0", "data.shuffle_buffer", 0),  # the loader reads max(1, window)
    ("monitor.min_target_rank=0", "monitor.min_target_rank", 0.0),  # RankMe guard off
    ("tracking.system_metrics_every_s=0", "tracking.system_metrics_every_s", 0.0),  # system metrics off
    ("masking.vision.max_block_patches=0", "masking.vision.max_block_patches", 0),  # no limit
    ("masking.vision_v2.adjust=-0.05", "masking.vision_v2.adjust", -0.05),  # fewer centres
    ("ema.anneal_steps=0", "ema.anneal_steps", 0),  # end_decay from the start
    ("ema.decay=1", "ema.decay", 1.0),  # a frozen teacher
    ("data.max_bad_fraction=1", "data.max_bad_fraction", 1.0),
    ("seed=4294967295", "seed", 2**32 - 1),
]


@pytest.mark.parametrize("override, key, expected", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_off_values_are_accepted(override, key, expected):
    r = load_recipe(_tiny("vision"), [override])
    value = r
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def _is_number_type(tp) -> bool:
    """int, float, Optional of them, or lists of them (Literal ints are closed sets already)."""
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_number_type(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return _is_number_type(typing.get_args(tp)[0])
    return False


def _numeric_fields(cls=Recipe, prefix=""):
    """(dotted key, field, type) of every numeric field of the recipe tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif _is_number_type(tp):
            yield f"{prefix}{f.name}", f, tp


NUMERIC = list(_numeric_fields())


def test_every_numeric_key_declares_a_range():
    assert len(NUMERIC) > 80  # the walk found the tree (no silent pass over an empty list)
    missing = [key for key, f, _ in NUMERIC if "bounds" not in f.metadata]
    assert not missing, f"numeric recipe keys without bounded(...): {missing}"


def _outside(f, tp):
    """A value just outside the field's bounds (None when it has none), of the field's item type."""
    b = f.metadata.get("bounds")  # a field without any fails test_every_numeric_key_declares_a_range
    if b is None:
        return None
    item_tp = tp
    while typing.get_origin(item_tp) in (list, typing.Union, types.UnionType):
        item_tp = next(a for a in typing.get_args(item_tp) if a is not type(None))
    if b.lo is not None:
        bad = b.lo if b.lo_open else b.lo - 1
    elif b.hi is not None:
        bad = b.hi if b.hi_open else b.hi + 1
    else:
        return None
    bad = item_tp(bad)
    depth = 0
    t = tp
    while typing.get_origin(t) is list:
        t, depth = typing.get_args(t)[0], depth + 1
    for _ in range(depth):
        bad = [bad]
    return bad


BOUNDED = [(key, bad, f.metadata["bounds"]) for key, f, tp in NUMERIC if (bad := _outside(f, tp)) is not None]


@pytest.mark.parametrize("key, bad, bounds", BOUNDED, ids=[b[0] for b in BOUNDED])
def test_every_range_refuses_a_value_just_outside_it(key, bad, bounds):
    tree: dict = {}
    node = tree
    *sections, name = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[name] = bad
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tree, "t.yaml", require_data=False)
    item_key = key + "[0]" * str(bad).count("[")
    assert str(e.value) == f"t.yaml: '{item_key}' must be {bounds}, got {_first(bad)!r}"


def _first(value):
    while isinstance(value, list):
        value = value[0]
    return value


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
@pytest.mark.parametrize("version", [1, 2])
def test_the_defaults_are_inside_their_ranges(modality, version):
    r = recipe_from_dict({"model": {"modality": modality, "version": version}}, "<defaults>", require_data=False)
    assert r.model.modality == modality


SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


def test_shipped_recipes_found():
    assert len(SHIPPED) > 20 and "recipes/vision/v2-huge.yaml" in SHIPPED  # runs, model/ parts, cluster/ parts


@pytest.mark.parametrize("recipe", SHIPPED)
def test_shipped_recipes_still_validate(recipe):
    assert isinstance(load_recipe(REPO / recipe, require_data=False), Recipe)


def test_pretrain_refuses_before_building_anything(tmp_path, capsys, monkeypatch):
    from scaling.pretrain import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    argv = [str(_tiny("vision"))]
    for s in (f"checkpoint.dir={tmp_path}/ckpt", "tracking.enabled=false", "train.log_every=0"):
        argv += ["--set", s]
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scaling-pretrain: error:")]
    assert len(err) == 1 and "'train.log_every' must be >= 1, got 0" in err[0], err
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- batch plan
def _splits_evenly(batch: int, world: int, micro: int) -> bool:
    return batch % (world * micro) == 0


def test_a_much_smaller_micro_batch_warns_with_the_numbers():
    cfg = TrainConfig(global_batch_size=34, micro_batch_size=16)
    with pytest.warns(UserWarning) as record:
        plan = BatchPlan.from_config(cfg, world_size=2)
    assert (plan.micro_batch_size, plan.accumulation) == (1, 17)
    (w,) = record
    message = str(w.message)
    assert ("micro-batch 1 x accumulation 17 per rank, well under train.micro_batch_size (16): "
            "train.global_batch_size 34 on 2 ranks is 17 samples per rank, which no size from 2 to 16 divides"
            in message), message
    # The suggested batches: the nearest ones on either side that split into micro-batches of 16 on 2
    # ranks, found here by trying every batch size.
    suggested = [int(b) for b in re.search(r"train\.global_batch_size (\d+) or (\d+) would split evenly", message)
                 .groups()]
    below = max(b for b in range(1, 34) if _splits_evenly(b, 2, 16))
    above = min(b for b in range(35, 200) if _splits_evenly(b, 2, 16))
    assert suggested == [below, above]
    for b in suggested:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = BatchPlan.from_config(TrainConfig(global_batch_size=b, micro_batch_size=16), world_size=2)
        assert p.micro_batch_size == 16


def test_the_warning_suggests_the_even_splits_around_the_batch():
    # 38 on 2 ranks with micro 8: 19 per rank (prime) -> micro 1 x 19; even splits are multiples of 16.
    with pytest.warns(UserWarning, match=r"train\.global_batch_size 32 or 48 would split evenly into micro-batches "
                                         r"of 8 on 2 ranks"):
        plan = BatchPlan.from_config(TrainConfig(global_batch_size=38, micro_batch_size=8), world_size=2)
    assert (plan.micro_batch_size, plan.accumulation) == (1, 19)


@pytest.mark.parametrize("batch, micro, world", [
    (32, 16, 2),  # exact: 16 x 1
    (8, 16, 2),  # the share (4) fits in one micro-batch: accumulation 1, nothing lost
    (30, 4, 2),  # 15 per rank -> 3 x 5: 3 is not under half of 4
    (48, 5, 3),  # 16 per rank -> 4 x 4
])
def test_no_warning_when_the_micro_batch_is_near_what_was_asked(batch, micro, world):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = BatchPlan.from_config(TrainConfig(global_batch_size=batch, micro_batch_size=micro), world_size=world)
    assert plan.micro_batch_size * 2 >= micro or plan.accumulation == 1


def test_resolve_reports_the_small_micro_batch_once_as_a_plan_note():
    r = load_recipe(_tiny("vision"), ["train.global_batch_size=34", "train.micro_batch_size=16"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolve notes it (printed by rank 0 only), it does not warn per rank
        plan = resolve(r, 2)
    notes = [n for n in plan.notes if "well under train.micro_batch_size (16)" in n]
    assert len(notes) == 1 and "32 or 64 would split evenly" in notes[0]
    assert "note: " + notes[0] in plan.lines()
