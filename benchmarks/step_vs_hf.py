"""Our data2vec v1 training step against a plain one written on HF transformers, side by side.

Per modality, in ONE process and from the same initial weights: our step (``Trainer.train_step`` on
the single engine) and the plain step of ``benchmarks/hf_step.py`` (transformers' Data2Vec*Model,
a deep-copied teacher, a Python EMA loop, torch AdamW), on the same prefetched batches (same sizes,
masks and precision), so only the step is timed. Reported:

- ms per step, the median over ``--repeats`` interleaved repeats (ours then HF, then HF then ours,
  ...) of the mean over ``--steps`` steps; no synchronize inside a timed repeat, one at each end;
  also the fastest repeat. Ratio ours / HF (goal <= 0.9) two ways: the median of the repeat pairs'
  ratios (a pair runs back to back, so a shared machine's changing load hits both alike) and the
  ratio of the fastest repeats (load only ever adds time);
- the split of each step into student forward + backward, teacher forward, targets + loss,
  optimizer (clip, AdamW, LR schedule, zero grad), EMA and the rest, from separate split repeats
  with a device synchronize around every region (``RegionTimer``; never in the timed repeats),
  shown for each side's fastest split repeat.
  Ours is split by wrapping what ``Trainer.train_step`` calls (``engine.model`` and
  ``engine.teacher`` forwards, ``engine.backward``, ``engine.step``, ``make_targets`` and
  ``regression_loss``, ``EMATeacher.update``); our "student fwd" includes the frontend's pass that
  makes the teacher's input (speech: the positional conv on the unmasked features);
- the framework overhead ratio of our step: a split repeat's whole step time / its student fwd +
  bwd + teacher fwd (median over split repeats; goal <= 1.05). The denominator is the model
  compute no step avoids; the numerator adds targets, loss, optimizer, EMA and everything else.
  On CUDA the region syncs are part of both.

Settings (``SETTINGS``; the base recipes' objective, masking, optimiser and dropouts, and
``--precision``): vision ViT depth 6, dim 384, 6 heads, FFN 1536, 224 px, patch 16, batch 8, top-K 3
(the base recipe's 6 of 12 scaled to depth 6); speech 6 blocks of 384 with a 256-channel CNN
(wav2vec 2.0's kernels and strides), 4 clips of 2 s (all one length: unpadded, where HF's model is
ours), top-K 4, LayerDrop off (the two sides draw it differently); text 6 blocks of 384,
vocabulary 8,192, 8 blocks of up to 128 tokens (synthetic lengths, padded), top-K 5. ``--quick``
shrinks all three (depth 2, dim 128, batch 4, top-K 1; vision 112 px, speech a 64-channel CNN on
1 s clips) and runs 3 repeats of 2 steps: a smoke run of well under a minute on a quiet machine.

    python benchmarks/step_vs_hf.py                          # all three, fp32, 2 threads, CPU
    python benchmarks/step_vs_hf.py --modality vision --repeats 7 --steps 3
    python benchmarks/step_vs_hf.py --device cuda --precision recipe
    python benchmarks/step_vs_hf.py --quick

``our_step_fn`` holds every use of Trainer and engine internals, so that it is the one place to
adapt when they change.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.hf_step import PlainHFStep, RegionTimer, sync_fn  # noqa: E402
from scaling.config import load_recipe  # noqa: E402
from scaling.data import build_loader  # noqa: E402
from scaling.models import build_model  # noqa: E402
from scaling.plan import pick_precision, resolve  # noqa: E402

REGIONS = ("student fwd", "student bwd", "teacher fwd", "targets+loss", "optimizer", "EMA")
_WIDE = ["model.depth=6", "model.dim=384", "model.heads=6", "model.ffn_dim=1536"]
_NARROW = ["model.depth=2", "model.dim=128", "model.heads=4", "model.ffn_dim=256"]


def _cnn(channels: int) -> str:  # wav2vec 2.0's kernels and strides (320x), narrower
    return "model.speech.conv_layers=" + str([[channels, k, s] for k, s in
                                              [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]])


def _clips(samples: int) -> list[str]:  # every clip one length: no padding (HF's model is ours there)
    return [f"data.speech.min_samples={samples}", f"data.speech.max_samples={samples}",
            "train.global_batch_seconds=0", "train.micro_batch_seconds=0"]


# modality -> setting -> (batch, overrides of recipes/<modality>/base.yaml, in words)
SETTINGS = {
    "vision": {"default": (8, _WIDE + ["objective.top_k=3"], "ViT 6x384, 224 px / 16, batch 8, top-K 3"),
               "quick": (4, _NARROW + ["objective.top_k=1", "model.vision.image_size=112"],
                         "ViT 2x128, 112 px / 16, batch 4, top-K 1")},
    "speech": {"default": (4, _WIDE + ["objective.top_k=4", "model.speech.layerdrop=0", _cnn(256)] + _clips(32000),
                           "6x384, CNN 256 ch, 4 x 2 s, top-K 4"),
               "quick": (4, _NARROW + ["objective.top_k=1", "model.speech.layerdrop=0", _cnn(64)] + _clips(16000),
                         "2x128, CNN 64 ch, 4 x 1 s, top-K 1")},
    "text": {"default": (8, _WIDE + ["objective.top_k=5", "model.text.vocab_size=8192", "data.text.block_size=128",
                                     "data.text.tokenizer="], "6x384, vocab 8192, 8 x <=128 tokens, top-K 5"),
             "quick": (4, _NARROW + ["objective.top_k=1", "model.text.vocab_size=8192", "data.text.block_size=128",
                                     "data.text.tokenizer="], "2x128, vocab 8192, 4 x <=128 tokens, top-K 1")},
}


def make_recipe(modality: str, *, device: str, precision: str, quick: bool):
    batch, extra, words = SETTINGS[modality]["quick" if quick else "default"]
    overrides = ["engine.name=single", f"train.device={device}", f"train.precision={precision}",
                 "tracking.enabled=false", "data.train_shards=synthetic", "data.num_workers=0",
                 f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}", "train.reference_batch=0",
                 "train.max_steps=100000", *extra]
    recipe = resolve(load_recipe(REPO / "recipes" / modality / "base.yaml", overrides), 1, read_data=False).resolved()
    return recipe, words


def our_step_fn(recipe) -> SimpleNamespace:
    """Our step, built as ``scaling.pretrain.run`` builds it (engine, seeded model, Trainer; no loader,
    tracker or checkpointer). Returns ``step(micro_batches) -> loss``, the student's initial
    ``state`` and ``instrument(timer)``, a context that times the regions of ``Trainer.train_step``
    by wrapping what it calls. Every use of Trainer/engine internals is in this function."""
    import scaling.trainer as trainer_module
    from scaling.data.quality import STAT_NAMES
    from scaling.engines import build_engine
    from scaling.teacher import EMATeacher
    from scaling.trainer import Trainer

    planned = resolve(recipe, 1, read_data=False)
    engine = build_engine(recipe.engine, recipe.train)
    torch.manual_seed(recipe.seed)
    student = build_model(recipe.model)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    engine.setup(student, None, recipe.optim, recipe.schedule, max_steps=recipe.train.max_steps, plan=planned.batch)
    kwargs = dict(train_cfg=recipe.train, objective_cfg=recipe.objective, ema_cfg=recipe.ema,
                  monitor_cfg=recipe.monitor, plan=planned.batch, engine=engine, loader=None, tracker=None,
                  checkpointer=None, model_cfg=recipe.model)
    # Two trainer APIs (the step is being rewritten to make no host sync): the older one takes
    # grad_clip and data_stats and returns host floats; the newer one returns device values.
    if "grad_clip" in inspect.signature(Trainer.__init__).parameters:
        kwargs["grad_clip"] = recipe.optim.grad_clip
    trainer = Trainer(**kwargs)
    takes_data_stats = "data_stats" in inspect.signature(Trainer.train_step).parameters
    data_stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)

    def step(micro_batches: list[dict]):
        if takes_data_stats:
            out = trainer.train_step(micro_batches, data_stats, measure=False)
        else:
            out = trainer.train_step(micro_batches, measure=False)
        trainer.step += 1  # what Trainer.run does after each step (the EMA decay reads it)
        if hasattr(out, "loss"):
            return out.loss  # a host float: the step synchronised already
        return out.scalars[0] / out.scalars[1]  # loss sum / masked count, still on the device

    @contextlib.contextmanager
    def instrument(timer: RegionTimer):
        def timed(name, fn):
            def call(*args, **kwargs):
                with timer.region(name):
                    return fn(*args, **kwargs)
            return call

        model, teacher = engine.model, engine.teacher
        ema_update = EMATeacher.__dict__["update"]
        functions = {name: getattr(trainer_module, name) for name in ("make_targets", "regression_loss")}
        model.forward = timed("student fwd", model.forward)
        teacher.forward = timed("teacher fwd", teacher.forward)
        engine.backward = timed("student bwd", engine.backward)
        engine.step = timed("optimizer", engine.step)
        EMATeacher.update = staticmethod(timed("EMA", ema_update.__func__))
        for name, fn in functions.items():
            setattr(trainer_module, name, timed("targets+loss", fn))
        try:
            yield
        finally:
            for obj in (model, teacher, engine):
                for attr in ("forward", "backward", "step"):
                    obj.__dict__.pop(attr, None)
            EMATeacher.update = ema_update
            for name, fn in functions.items():
                setattr(trainer_module, name, fn)

    return SimpleNamespace(step=step, state=state, instrument=instrument, device=engine.device, engine=engine)


def prefetch(recipe, count: int) -> list[dict]:
    loader = build_loader(recipe.data, recipe.model, recipe.masking, seed=recipe.seed, rank=0, world_size=1,
                          micro_batch_size=recipe.train.micro_batch_size)
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def bench_modality(modality: str, args) -> dict:
    precision = args.precision
    if precision == "recipe":  # the base recipes' GPU cluster file says bf16; CPU recipes say auto
        precision = pick_precision("bf16" if args.device == "cuda" else "auto", args.device)
    recipe, words = make_recipe(modality, device=args.device, precision=precision, quick=args.quick)
    ours = our_step_fn(recipe)
    plain = PlainHFStep(recipe, ours.state, device=ours.device, precision=precision)
    batches = prefetch(recipe, args.steps)
    sync = sync_fn(ours.device)
    sides = {"ours": ours.step, "HF": plain.step}

    def run_steps(step) -> float:
        sync()
        t0 = time.perf_counter()
        loss = None
        for b in batches:
            loss = step([b])
        sync()
        float(loss)  # the plain step's loss stays on the device until here
        return (time.perf_counter() - t0) / len(batches) * 1e3

    for _ in range(args.warmup):
        for step in sides.values():
            run_steps(step)
    timed = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (("ours", "HF") if r % 2 == 0 else ("HF", "ours")):
            timed[name].append(run_steps(sides[name]))

    split = {name: [] for name in sides}  # per split repeat: region -> ms per step, with "total"
    for r in range(args.split_repeats):
        for name in (("ours", "HF") if r % 2 == 0 else ("HF", "ours")):
            timer = RegionTimer(ours.device)
            context = ours.instrument(timer) if name == "ours" else contextlib.nullcontext()
            plain.timer = timer if name == "HF" else None
            with context:
                total = run_steps(sides[name])
            plain.timer = None
            split[name].append({**{k: v / len(batches) * 1e3 for k, v in timer.seconds.items()}, "total": total})

    # A shared machine's load changes over minutes and only ever adds time: the ratio of each repeat
    # pair (run back to back) is steadier than the ratio of the two medians, and the fastest repeat is
    # the least disturbed one.
    pair_ratios = [a / b for a, b in zip(timed["ours"], timed["HF"])]
    result = {"modality": modality, "setting": words, "precision": precision,
              "attn": plain.student.config._attn_implementation,
              "params_M": sum(p.numel() for p in plain.params) / 1e6,
              "ms": {k: statistics.median(v) for k, v in timed.items()},
              "min_ms": {k: min(v) for k, v in timed.items()}, "all_ms": timed,
              "ratio": statistics.median(pair_ratios), "split": {}}
    for name, rows in split.items():  # the fastest split repeat: one consistent breakdown
        row = min(rows, key=lambda r: r["total"])
        parts = {k: row.get(k, 0.0) for k in REGIONS}
        parts["rest"] = row["total"] - sum(parts.values())
        parts["total"] = row["total"]
        result["split"][name] = parts
    # Overhead from one split repeat's total and model regions (the same moment's load for both).
    result["overhead"] = statistics.median(
        row["total"] / (row.get("student fwd", 0.0) + row.get("student bwd", 0.0) + row.get("teacher fwd", 0.0))
        for row in split["ours"])
    return result


def tables(results: list[dict], args) -> str:
    lines = [f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{args.repeats} timed repeats x {args.steps} steps (median of repeat means; ours / HF: median of the "
             f"repeat pairs' ratios), "
             f"{args.split_repeats} split repeats; warm-up {args.warmup} x {args.steps} steps per side", "",
             "| modality | setting | precision | HF attention | params | ours ms/step (median, min) "
             "| HF ms/step (median, min) | ours / HF (pairs) | ours / HF (min) | overhead (step / model fwd+bwd+teacher) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['modality']} | {r['setting']} | {r['precision']} | {r['attn']} | {r['params_M']:.1f} M "
                     f"| {r['ms']['ours']:.1f}, {r['min_ms']['ours']:.1f} | {r['ms']['HF']:.1f}, {r['min_ms']['HF']:.1f} "
                     f"| {r['ratio']:.3f} | {r['min_ms']['ours'] / r['min_ms']['HF']:.3f} | {r['overhead']:.3f} |")
    lines += ["", "Split (ms per step, the fastest split repeat of each side; synchronised regions; share of its total):",
              "", "| modality | step | student fwd+bwd | teacher fwd | targets+loss | optimizer | EMA | rest | total |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("ours", "HF"):
            p = r["split"][name]
            cells = [p["student fwd"] + p["student bwd"], p["teacher fwd"], p["targets+loss"], p["optimizer"],
                     p["EMA"], p["rest"]]
            lines.append(f"| {r['modality']} | {name} | " + " | ".join(
                f"{c:.1f} ({100 * c / p['total']:.0f}%)" for c in cells) + f" | {p['total']:.1f} |")
    lines += ["", "Timed repeats, ms per step (ours / HF): " + "; ".join(
        f"{r['modality']} " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r["all_ms"]["ours"], r["all_ms"]["HF"]))
        for r in results)]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", default="vision,speech,text", help="comma-separated: vision, speech, text")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "recipe"],
                   help="recipe: bf16 on CUDA (the GPU cluster recipe), precision auto on CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side, interleaved")
    p.add_argument("--steps", type=int, default=3, help="steps per repeat (distinct prefetched batches)")
    p.add_argument("--split-repeats", type=int, default=3, help="repeats with synchronised regions")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats per side first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smoke: small models, 3 repeats of 2 steps")
    args = p.parse_args(argv)
    modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
    unknown = sorted(set(modalities) - set(SETTINGS))
    if unknown or not modalities:
        p.error(f"--modality: unknown {unknown}; expected a comma-separated subset of {sorted(SETTINGS)}")
    args.modalities = modalities
    if args.quick:
        args.repeats, args.steps, args.split_repeats = 3, 2, 1
    if min(args.repeats, args.steps, args.split_repeats) < 1:
        p.error("--repeats, --steps and --split-repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for modality in args.modalities:
        t0 = time.perf_counter()
        results.append(bench_modality(modality, args))
        r = results[-1]
        print(f"[step_vs_hf] {modality}: ours {r['ms']['ours']:.1f} ms, HF {r['ms']['HF']:.1f} ms, "
              f"overhead {r['overhead']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(tables(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
