"""``scaling-pretrain RECIPE [--set key.path=value ...]``: recipe -> engine -> Trainer.run()."""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from scaling.checkpoint import (Checkpointer, CheckpointWriteError, NonFiniteStateError, check_resume,
                                checkpoint_step, find_latest, resume_path)
from scaling.config import Recipe, load_recipe
from scaling.convert import initial_weights, load_initial_weights
from scaling.data import build_loader
from scaling.data.quality import BadDataError
from scaling.distributed import CollectiveFailure, collective_failure, env_info
from scaling.engines import build_engine, engine_class
from scaling.models import build_model
from scaling.plan import resolve
from scaling.teacher import EMATeacher
from scaling.tracking import Tracker, record_run, summary_lines
from scaling.trainer import CollapseError, DivergenceError, StepStats, Trainer

log = logging.getLogger("scaling")


@dataclass
class RunResult:
    history: list[StepStats]
    start_step: int
    step: int
    checkpoint: Path | None
    mlflow_run_id: str | None
    memory: dict[str, float]  # per-rank bytes after the first step (memory/rank{r}/{kind}_bytes)
    full_state: dict | None  # gathered student.* / teacher.* tensors (rank 0), when asked for
    rank: int
    run_info: dict | None = None  # what run.json says (rank 0, at the end of a run that trained)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scaling-pretrain", description=__doc__)
    p.add_argument("recipe", help="recipes/<modality>/<size>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value (repeatable), e.g. --set train.max_steps=30")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and exit after this step; the LR and EMA schedules still span train.max_steps "
                        "(for time-limited or preemptible jobs)")
    p.add_argument("--check", action="store_true",
                   help="only validate the recipe, the engine and the batch plan for --world-size ranks: exit 0 "
                        "silently or 2 with one error line (the launchers run this before starting any rank)")
    p.add_argument("--world-size", type=int, default=0, help="with --check: the job's ranks (0: check the recipe only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; torchrun sets LOCAL_RANK instead")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(recipe: Recipe, *, stop_at_step: int | None = None, gather_state: bool = False,
        recipe_path: str | Path | None = None) -> RunResult:
    # Everything a user can get wrong is settled before anything is built or joins a process group:
    # the engine against the launcher's world size, the batch plan, whether the checkpoint resumes.
    dist_env = env_info()
    engine_class(recipe.engine.name).check_world_size(dist_env.world_size)
    planned = resolve(recipe, dist_env.world_size, read_data=False)  # the loader reads the shard indexes
    recipe = planned.resolved()  # step counts, LR and precision as this run trains them
    resume_from = resume_path(recipe.checkpoint)
    resume_warnings = []
    if resume_from is not None:
        resume_warnings = check_resume(resume_from, recipe, world_size=dist_env.world_size,
                                       checkpoint_format=engine_class(recipe.engine.name).checkpoint_format)
        done = checkpoint_step(resume_from)
        if done >= recipe.train.max_steps:
            if dist_env.rank == 0:
                print(f"[scaling] nothing to do: {resume_from} is step {done} and train.max_steps is "
                      f"{recipe.train.max_steps}, so this run is complete. To train longer, rerun with --set "
                      f"train.max_steps=N (N > {done}): the LR and EMA schedules are re-planned over the new "
                      "length; or start a new run with another checkpoint.dir.", flush=True)
            return RunResult([], done, done, resume_from, None, {}, None, dist_env.rank)
        for message in resume_warnings:
            log.warning("resuming from %s: %s", resume_from, message)
        if recipe.model.init_from:
            log.info("resuming from %s: model.init_from=%s is not used", resume_from, recipe.model.init_from)
    init = None  # read (and checked against the recipe) before anything is built
    if recipe.model.init_from and resume_from is None:
        init = initial_weights(recipe)
    with contextlib.ExitStack() as cleanup:  # closed in reverse order, whatever fails
        engine = build_engine(recipe.engine, recipe.train)
        cleanup.callback(engine.close)
        plan = planned.batch
        # Same seed on every rank: the student starts identical everywhere and the teacher is its copy.
        seed_everything(recipe.seed)
        student = build_model(recipe.model)
        if init is not None:
            load_initial_weights(student, init[0])
        teacher = None  # the engine copies the student's encoder (fsdp: its local shards, after sharding)
        if init is not None and init[1] is not None:  # init_from had a teacher of its own
            teacher = EMATeacher(student.encoder)
            teacher.load_state_dict(init[1])
        engine.setup(student, teacher, recipe.optim, recipe.schedule, max_steps=recipe.train.max_steps, plan=plan)
        loader = build_loader(recipe.data, recipe.model, recipe.masking, seed=recipe.seed, rank=engine.rank,
                              world_size=engine.world_size, micro_batch_size=plan.micro_batch_size,
                              max_batch_audio_samples=plan.micro_batch_audio_samples, device=engine.device)
        cleanup.callback(loader.close)  # DataLoader workers stop here, before the engine's process group
        planned = planned.with_loader(loader)
        checkpointer = Checkpointer(recipe.checkpoint, engine, recipe)  # this job's checkpoint.dir from here on
        cleanup.callback(checkpointer.close)

        start_step, run_id = 0, None
        if resume_from is not None:
            state = checkpointer.load(resume_from)
            data_states = state["data_states"]
            if not loader.same_layout(data_states[0]):  # another worker count: the catch-up needs every rank's state
                data_states = checkpointer.data_states(resume_from)
            loader.load_job_state(data_states)  # exact, or a catch-up on another layout
            start_step, run_id = state["step"], state.get("mlflow_run_id")
            if not state["same_world"]:
                torch.manual_seed(recipe.seed + 1000 * (engine.rank + 1) + 7919 * start_step)
            log.info("resumed from %s at step %d", resume_from, start_step)
        else:
            # Dropout and augmentation streams differ per rank; the model init above did not.
            torch.manual_seed(recipe.seed + 1000 * (engine.rank + 1))

        tracker = Tracker(recipe.tracking, active=engine.rank == 0)
        tracker.start(recipe, run_id=run_id, recipe_path=recipe_path, world_size=engine.world_size, plan=plan,
                      start_step=start_step)
        cleanup.push(lambda failed, *_: tracker.finish("FAILED" if failed else "FINISHED"))
        if resume_warnings:
            tracker.set_tags({f"warning.resume_step_{start_step}": " / ".join(resume_warnings)})
        trainer = Trainer(train_cfg=recipe.train, objective_cfg=recipe.objective, ema_cfg=recipe.ema,
                          monitor_cfg=recipe.monitor, plan=plan, engine=engine,
                          loader=loader, tracker=tracker, checkpointer=checkpointer, model_cfg=recipe.model,
                          seed=recipe.seed)
        if engine.rank == 0:
            print(f"[scaling] {recipe.model.modality}: {plan}; engine {recipe.engine.name}; "
                  f"steps {start_step}->{min(recipe.train.max_steps, stop_at_step or recipe.train.max_steps)}",
                  flush=True)
            print("[scaling] plan: " + "; ".join(line for line in planned.lines()[1:]
                                                 if not line.startswith(("data:", "note:"))), flush=True)
            for note in planned.notes:
                log.warning("plan: %s", note)
            if recipe.data.train_shards.strip() == "synthetic":
                log.warning("data: SYNTHETIC random samples (data.train_shards=synthetic): this run learns "
                            "nothing about real data. Set data.train_shards to your shards.")
            else:
                print(f"[scaling] data: {planned.data}", flush=True)
        history = trainer.run(start_step=start_step, stop_at_step=stop_at_step)
        checkpointer.wait()  # an asynchronous last save completes before the run ends
        checkpoint = find_latest(Path(recipe.checkpoint.dir))
        run_info = None
        if engine.rank == 0:  # run.json beside the checkpoints, and the end-of-run MLflow artifacts
            run_info = record_run(recipe, trainer.summary(), tracker=tracker, checkpoint=checkpoint,
                                  world_size=engine.world_size,
                                  deepspeed_config=engine.cfg if recipe.engine.name == "deepspeed" else None)
        full_state = engine.full_state_dict() if gather_state else None
    return RunResult(history, start_step, trainer.step, checkpoint, tracker.run_id, trainer.memory, full_state,
                     engine.rank, run_info)


@record  # an uncaught exception goes to torchrun's error file: its summary names the rank and the error
def main(argv: list[str] | None = None) -> int:
    rank = env_info().rank
    # Other ranks log warnings and errors only: one INFO stream per job, not one per rank.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)  # validates every key before anything starts
        if args.check:
            if args.world_size > 0:
                engine_class(recipe.engine.name).check_world_size(args.world_size)
                resolve(recipe, args.world_size, read_data=False)
            return 0
        result = run(recipe, stop_at_step=args.stop_at_step, recipe_path=args.recipe)
    except (ValueError, NonFiniteStateError, CheckpointWriteError, CollapseError, DivergenceError,
            BadDataError) as exn:
        # User errors (recipe, checkpoint, numbers) and run failures the run already explained: one
        # line from rank 0, no traceback; every rank exits with the same code.
        log.debug("run failed", exc_info=True)
        if rank == 0:
            print(f"scaling-pretrain: error: {exn}", file=sys.stderr, flush=True)
        return 2 if isinstance(exn, ValueError) else 1
    except Exception as exn:
        line = collective_failure(exn)  # another rank hung, stopped or died: say so, on every rank that saw it
        if line is None:
            raise
        log.debug("collective failed", exc_info=True)
        print(f"scaling-pretrain: error: {line}", file=sys.stderr, flush=True)
        _record_for_launcher(line)
        return 1
    if result.rank != 0:
        return 0
    if result.history:
        last = result.history[-1]
        print(f"[scaling] step {result.step}: loss {last.loss:.4f} (first {result.history[0].loss:.4f}), "
              f"target_var {last.target_var:.3f}, pred_var {last.pred_var:.3f}", flush=True)
    for line in summary_lines(result.run_info, recipe.checkpoint.dir):
        print(f"[scaling] {line}", flush=True)
    if result.run_info is None:
        print(f"[scaling] checkpoint: {result.checkpoint}", flush=True)
    return 0


def _record_for_launcher(line: str) -> None:
    """The one line as torchrun's failure summary shows it (its error file, as ``@record`` writes one
    for an uncaught exception), without a traceback printed by this rank."""
    try:
        raise CollectiveFailure(line) from None
    except CollectiveFailure as exn:
        get_error_handler().record_exception(exn)


if __name__ == "__main__":
    sys.exit(main())
