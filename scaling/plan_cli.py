"""``scaling-plan RECIPE --world-size N``: what a run of RECIPE on N ranks does and holds, without training.

Prints the batch plan (micro-batch x accumulation x world) and a table of the per-rank memory
estimate (scaling/memory.py) for every engine that runs at N: ``single`` on one rank, ``ddp`` on
more (it replicates: the same bytes at any N), ``fsdp`` and DeepSpeed ZeRO-1/2/3; columns in GiB.
``--dry-run`` builds the real sharded student and teacher of the chosen engine (default fsdp) on a
fake process group of N ranks (scaling/dry_run.py) and prints the measured bytes next to the
estimate. A bad recipe or a bad number exits 2 with one ``scaling-plan: error:`` line.
"""

from __future__ import annotations

import argparse
import sys

from scaling.config import Recipe, load_recipe
from scaling.memory import GiB, KINDS, engine_row, estimate, estimate_table, micro_batch_shape

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaling-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipes/<modality>/<size>.yaml")
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks (GPUs)")
    p.add_argument("--engine", choices=["single", "ddp", "fsdp", "deepspeed"], default=None,
                   help="the engine to mark and to dry-run (default: the recipe's; fsdp for --dry-run "
                        "when the recipe says single or ddp)")
    p.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=None, help="ZeRO stage for --engine deepspeed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value (repeatable), as scaling-pretrain takes it")
    p.add_argument("--dry-run", action="store_true",
                   help="build the real sharded student and teacher on a fake process group of N ranks and "
                        "print the measured per-rank bytes next to the estimate")
    return p.parse_args(argv)


def load_for_plan(path: str, overrides: list[str]) -> tuple[Recipe, list[str]]:
    """The recipe with the overrides, and notes. Planning reads no data, so a recipe that leaves
    ``data.train_shards`` to the command line is planned without it (with a note)."""
    recipe = load_recipe(path, overrides, require_data=False)
    notes = [] if recipe.data.train_shards.strip() else ["data.train_shards is not set: planned without a data set"]
    return recipe, notes


def _batch_lines(recipe: Recipe, world_size: int) -> list[str]:
    """The batch plan at this world size (scaling/plan.py: micro-batch, accumulation, LR, steps, epochs)."""
    from scaling.plan import resolve

    return resolve(recipe, world_size).lines()


def _gib(n: float) -> str:
    return f"{n / GiB:9.3f}"


def memory_lines(recipe: Recipe, world_size: int, chosen: str, measured: dict[str, int] | None) -> list[str]:
    rows = estimate_table(recipe, world_size)
    batch, positions = micro_batch_shape(recipe, world_size)
    precision = recipe.train.precision + (" (counted as bf16)" if recipe.train.precision == "auto" else "")
    lines = [f"memory per rank, GiB (rank 0; activations per micro-batch of {batch} x {positions} positions, "
             f"{precision}):",
             f"  {'engine':8}" + "".join(f"{h:>10}" for h in ("params", "grads", "optimizer", "teacher", "gathered",
                                                              "act", "act(AC)", "total", "total(AC)"))]
    for e in rows:
        mark = "*" if e.engine == chosen else " "
        lines.append(f"{mark} {e.engine:8}" + " ".join(_gib(v) for v in (
            e.params, e.grads, e.optimizer, e.teacher, e.gathered, e.activations, e.activations_ac,
            e.total(False), e.total(True))))
    lines.append("  gathered: all-gathered parameters and gradient buffers at the peak (ddp: its gradient buckets); "
                 "act(AC): every encoder block checkpointed")
    if measured is not None:
        est = estimate(recipe, world_size, chosen, micro_batch=(batch, positions))
        lines.append(f"dry run ({chosen}, real engine on a fake process group of {world_size}, "
                     f"{measured['seconds']:.1f} s), GiB:")
        lines.append(f"  {'':10}" + "".join(f"{k:>10}" for k in KINDS))
        lines.append(f"  {'measured':10}" + " ".join(_gib(measured[k]) for k in KINDS))
        lines.append(f"  {'estimate':10}" + " ".join(_gib(getattr(est, k)) for k in KINDS))
        lines.append(f"  {'ratio':10}" + "".join(
            f"{measured[k] / getattr(est, k):10.4f}" if getattr(est, k) else f"{'-':>10}" for k in KINDS))
    return lines


def _chosen_row(recipe: Recipe, engine: str | None, zero_stage: int | None, world_size: int, dry_run: bool) -> str:
    name = engine or recipe.engine.name
    if zero_stage is not None and name != "deepspeed":
        raise ValueError(f"--zero-stage {zero_stage} needs --engine deepspeed (the engine is {name})")
    if name == "deepspeed":
        return f"zero{zero_stage or recipe.engine.zero_stage}"
    if dry_run and name in ("single", "ddp"):
        return "fsdp" if engine is None else name
    if name == "single" and world_size > 1:
        return "ddp"
    return engine_row(recipe) if engine is None else name


def plan_lines(path: str, world_size: int, *, engine: str | None = None, zero_stage: int | None = None,
               overrides: list[str] = (), dry_run: bool = False) -> list[str]:
    if world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {world_size}")
    recipe, notes = load_for_plan(path, list(overrides))
    chosen = _chosen_row(recipe, engine, zero_stage, world_size, dry_run)
    if chosen == "single" and world_size > 1:
        raise ValueError(f"--engine single runs on one rank, not {world_size}")
    lines = [f"[scaling-plan] {path}: {recipe.model.modality}, {recipe.model.depth} blocks of {recipe.model.dim}, "
             f"{world_size} rank{'s' if world_size > 1 else ''}"]
    lines += [f"note: {n}" for n in notes]
    try:
        batch = _batch_lines(recipe, world_size)
    except ValueError as exn:  # the memory still answers; the split needs another batch or world size
        batch = [f"does not split on {world_size} ranks: {exn}",
                 f"(activations below at train.micro_batch_size {recipe.train.micro_batch_size})"]
    lines += ["batch plan:"] + [f"  {b}" for b in batch]
    measured = None
    if dry_run:
        from scaling.dry_run import measure

        measured = measure(recipe, world_size, chosen)
    return lines + memory_lines(recipe, world_size, chosen, measured)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse itself exits 2 with "scaling-plan: error: ..." on bad arguments
    try:
        lines = plan_lines(args.recipe, args.world_size, engine=args.engine, zero_stage=args.zero_stage,
                           overrides=args.overrides, dry_run=args.dry_run)
    except ValueError as exn:  # recipe errors (RecipeError) and bad numbers: one line, no traceback
        print(f"scaling-plan: error: {exn}", file=sys.stderr, flush=True)
        return 2
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
