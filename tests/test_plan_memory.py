"""Per-rank memory estimate (scaling/memory.py), dry run (scaling/dry_run.py) and ``scaling-plan``.

- The estimate against what real 2-rank gloo runs of the tiny recipes hold after their first step
  (each engine's own ``memory_report()``, gathered by the trainer): fsdp (fp32) and ZeRO-3 (bf16)
  in one spawn. ZeRO-1/2 are checked against DeepSpeed's own partitioning in the dry run instead
  (a spawn each costs 40 s on 2 busy cores: a second real DeepSpeed engine in one process fails).
- The dry run (real engines on a fake process group, meta tensors) against the estimate at 64 and
  1,024 ranks, base and large, fsdp and ZeRO-3 (and ZeRO-1/2 at 64), within 5%; the modalities rotate over the cases so
  each is covered without building all 24 combinations. The large/1,024 cases are marked ``slow``
  (they run by default; ``-m "not slow"`` leaves them out).
- The CLI on every recipe under recipes/<modality>/ at 1, 8, 64 and 1,024 ranks, and its error line.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from dist_harness import REPO, engine_overrides, free_port, run_jobs, spawn
from scaling.config import ModelConfig, load_recipe
from scaling.memory import KINDS, estimate, fsdp_local_numel, model_params, zero3_partition_numel

NO_DATA = "data.train_shards=synthetic"
MODALITIES = typing.get_args(typing.get_type_hints(ModelConfig)["modality"])


# ----------------------------------------------------------------------------- estimate vs real 2-rank runs
def _two_rank_jobs(tmp_path, names):
    from dist_harness import ENGINES

    return [(ENGINES[n][0], engine_overrides(tmp_path, n)) for n in names]


@pytest.fixture(scope="module")
def two_rank_memory(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    out = {}
    names = ("fsdp", "zero3")
    jobs = _two_rank_jobs(tmp, names)
    ranks = spawn(run_jobs, jobs, [free_port() for _ in jobs[1:]])
    return {name: (jobs[i], ranks[0][i]["memory"]) for i, name in enumerate(names)}


@pytest.mark.parametrize("row", ["fsdp", "zero3"])
def test_estimate_matches_two_rank_run(two_rank_memory, row):
    (modality, overrides), memory = two_rank_memory[row]
    recipe = load_recipe(REPO / "recipes" / modality / "tiny.yaml", overrides)
    est = estimate(recipe, 2, row)
    for kind in KINDS:
        measured = [memory[f"memory/rank{r}/{kind}_bytes"] for r in range(2)]
        assert measured[0] == getattr(est, kind), (row, kind, measured, est)
        assert measured[1] <= measured[0], (row, kind, measured)  # rank 0 holds the largest piece


def test_partition_rules_on_uneven_shapes():
    # FSDP2: ceil(dim0 / world) rows, padded on every rank; ZeRO-3: ceil(numel / world) elements.
    assert fsdp_local_numel((768, 3), 1024) == 3 and fsdp_local_numel((1000, 2), 64) == 16 * 2
    assert zero3_partition_numel(768, 1024) == 1 and zero3_partition_numel(1001, 8) == 126
    params = model_params(load_recipe(REPO / "recipes" / "text" / "tiny.yaml").model)
    names = {p.name for p in params}
    assert any(n.startswith("frontend.") for n in names) and any(n.startswith("head.") for n in names)
    assert sum(p.block is not None for p in params) == 4 * len([n for n in names if n.startswith("encoder.blocks.0.")])


# ----------------------------------------------------------------------------- dry run at 64 and 1024 ranks
_slow = pytest.mark.slow
DRY_CASES = [  # (size, world, engine, modality): every modality, size, world and engine appears
    ("base", 64, "fsdp", "vision"), ("base", 64, "zero3", "speech"),
    ("base", 1024, "fsdp", "text"), ("base", 1024, "zero3", "vision"),
    ("large", 64, "fsdp", "speech"), ("large", 64, "zero3", "text"),
    ("base", 64, "zero1", "text"), ("large", 64, "zero2", "vision"),
    pytest.param("large", 1024, "fsdp", "vision", marks=_slow),
    pytest.param("large", 1024, "zero3", "speech", marks=_slow),
]


@pytest.mark.parametrize("size,world,row,modality", DRY_CASES)
def test_dry_run_matches_estimate(size, world, row, modality):
    from scaling.dry_run import measure

    recipe = load_recipe(REPO / "recipes" / modality / f"{size}.yaml", [NO_DATA])
    measured = measure(recipe, world, row)
    est = estimate(recipe, world, row)
    for kind in KINDS:
        assert measured[kind] > 0, kind
        assert abs(measured[kind] / getattr(est, kind) - 1) <= 0.05, (kind, measured[kind], getattr(est, kind))
    assert measured["seconds"] < 120


# ----------------------------------------------------------------------------- CLI
RECIPES = sorted(p for m in MODALITIES for p in (REPO / "recipes" / m).glob("*.yaml"))


def test_recipes_found():
    assert {p.parent.name for p in RECIPES} == set(MODALITIES) and len(RECIPES) >= 2 * len(MODALITIES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cli_prints_plan_for_every_world_size(path, capsys):
    from scaling.plan_cli import main

    for world in (1, 8, 64, 1024):
        assert main([str(path), "--world-size", str(world)]) == 0, world
        out = capsys.readouterr().out
        assert "batch plan:" in out and "memory per rank" in out
        rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()
                if line.strip() and line.lstrip("* ").split()[0] in ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")}
        assert set(rows) == {"single" if world == 1 else "ddp", "fsdp", "zero1", "zero2", "zero3"}, (world, rows)
        for line in rows.values():
            numbers = [float(x) for x in line.lstrip("* ").split()[1:]]
            assert len(numbers) == 9 and numbers[7] >= numbers[8] > 0, line  # total >= total with AC
        if world > 1:  # sharding shrinks fsdp and ZeRO-3 below ddp
            assert float(rows["fsdp"].lstrip("* ").split()[1]) < float(rows["ddp"].lstrip("* ").split()[1])


def test_cli_dry_run_prints_measured_ratio(capsys):
    from scaling.plan_cli import main

    assert main([str(REPO / "recipes" / "vision" / "tiny.yaml"), "--world-size", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    ratio = [line for line in out.splitlines() if line.strip().startswith("ratio")]
    assert ratio and all(abs(float(x) - 1) <= 0.05 for x in ratio[0].split()[1:]), out


@pytest.mark.parametrize("args,message", [
    (["--set", "model.dim=77"], "'model.heads' must divide model.dim (77)"),
    (["--set", "train.no_such_key=1"], "unknown key 'train.no_such_key'"),
    (["--world-size", "0"], "--world-size must be at least 1"),
])
def test_cli_error_is_one_line(args, message, capsys):
    from scaling.plan_cli import main

    argv = [str(REPO / "recipes" / "speech" / "base.yaml")] + (args if "--world-size" in args else
                                                               ["--world-size", "8", *args])
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling-plan: error: ") and message in lines[0], captured.err
    assert captured.out == ""
