"""Input path against model speed, per modality: how many DataLoader workers keep the device busy.

For each modality, with ``recipes/<modality>/base.yaml``'s data and masking settings and its
per-rank micro-batch (``scaling.plan.BatchPlan`` on one rank: 128 images, 237.5 s of
length-bucketed audio, 16 blocks of 512 tokens), in one run:

- input path: ``build_loader(device=...)`` ``next()`` + ``scaling.data.device.to_device``, in
  samples/s, for each worker count. On CUDA the loader pins its batches, vision batches leave the
  workers as uint8 and the image stage runs on the GPU (``data.device_stage``; ``--stage-off``
  adds rows with it off); each timing ends with a synchronize, so the asynchronous copies and the
  stage are inside it;
- model: one training step as the trainer's single engine runs it (student forward, teacher
  forward, targets, loss, backward, clip, AdamW, EMA update) at the same micro-batch, on batches
  already on the device: the loader's own first batches (moved once), and batches of
  ``data.synthetic_on_device`` (made on the device; its speech clips and text documents have the
  synthetic stream's lengths, 2-20 s and 8-510 tokens, so with ``--data files`` its speech and text
  batches are not the loader's shapes);
- workers needed = ceil(model samples/s / one worker's samples/s), one worker's rate from the
  1-worker row (that row's main process only collates, pins and copies).

Data: ``--data synthetic`` (default; the CPU synthetic source draws each sample with numpy: images
are gradients and rectangles made at full size, so their cost is not a JPEG decode's) or
``--data files``: ImageNet-sized JPEGs, 5-20 s FLAC clips and docstring text, built and sharded in
a temp dir by ``benchmarks/data_loader.py``'s builders. Model: ``--model base`` (the recipe's; the
default on CUDA) or ``--model small`` (2 blocks of 64, speech convs of 64 channels, same input
shapes and masks; the default on CPU, so that a run finishes there).

    python benchmarks/input_path.py --quick                       # CPU smoke, about a minute
    python benchmarks/input_path.py                               # CPU, base micro-batches, small model
    python benchmarks/input_path.py --device cuda --data files --workers 0,1,2,4,8 --stage-off
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.config import load_recipe  # noqa: E402
from scaling.data import build_loader  # noqa: E402
from scaling.data.device import to_device  # noqa: E402
from scaling.models import build_model  # noqa: E402
from scaling.objective import make_targets, regression_loss  # noqa: E402
from scaling.optim import build_optimizer  # noqa: E402
from scaling.plan import BatchPlan  # noqa: E402
from scaling.teacher import EMATeacher, ema_decay, ema_pairs  # noqa: E402

MODALITIES = ("vision", "speech", "text")
SMALL_MODEL = ["model.dim=64", "model.depth=2", "model.heads=2", "model.ffn_dim=128", "objective.top_k=2",
               "model.speech.conv_layers=[[64,10,5],[64,3,2],[64,3,2],[64,3,2],[64,3,2],[64,2,2],[64,2,2]]"]
# --quick on CPU: micro-batches a 2-core box turns over in seconds (the full ones with --no-quick).
QUICK_MICRO = {"vision": 16, "speech": 30.0, "text": 16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows(batch: dict) -> int:
    return int(batch["sample_id_B"].shape[0])


def audio_seconds(batch: dict, sample_rate: int) -> float:
    pad = batch.get("audio_padding_BT")
    return 0.0 if pad is None else float((~pad).sum()) / sample_rate


# ============================================================================= set-up
def recipe_for(modality: str, data_overrides: list[str], args) -> tuple:
    """(recipe, micro_batch_size, max_batch_audio_samples) for one modality."""
    sets = list(data_overrides) + (SMALL_MODEL if args.model == "small" else [])
    sets.append(f"train.device={args.device.type}")
    if args.quick:
        q = QUICK_MICRO[modality]
        sets += ([f"train.micro_batch_seconds={q}"] if modality == "speech" else [f"train.micro_batch_size={q}"])
    recipe = load_recipe(REPO / "recipes" / modality / "base.yaml", sets)
    plan = BatchPlan.from_config(recipe.train, 1, recipe.data.speech.sample_rate)
    return recipe, plan.micro_batch_size, plan.micro_batch_audio_samples


def make_loader(recipe, micro: int, audio: int, device: torch.device, **data_changes):
    data = dataclasses.replace(recipe.data, **data_changes)
    return build_loader(data, recipe.model, recipe.masking, seed=recipe.seed, rank=0, world_size=1,
                        micro_batch_size=micro, max_batch_audio_samples=audio, device=device)


def build_files(work: Path, args) -> dict[str, list[str]]:
    """benchmarks/data_loader.py's real-ish data (JPEGs, FLAC, docstrings), sharded under ``work``."""
    spec = importlib.util.spec_from_file_location("data_loader_bench", REPO / "benchmarks" / "data_loader.py")
    data_loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_loader)
    ns = argparse.Namespace(modalities=args.modalities, images=args.images, clips=args.clips,
                            text_chars=args.text_chars)
    return data_loader.build_all(work, ns)


# ============================================================================= timings
def input_rate(recipe, micro: int, audio: int, device: torch.device, workers: int, args,
               **data_changes) -> tuple[float, float, list[dict]]:
    """(samples/s, audio s/s) of next() + to_device over ``args.batches`` batches after warm-up; also
    the first warm-up batches on the device (for the model step)."""
    L = make_loader(recipe, micro, audio, device, num_workers=workers, **data_changes)
    try:
        first = [to_device(next(L), device) for _ in range(args.warmup)]
        sync(device)
        n, secs, t0 = 0, 0.0, time.perf_counter()
        for _ in range(args.batches):
            b = to_device(next(L), device)
            n += rows(b)
            secs += audio_seconds(b, recipe.data.speech.sample_rate) if recipe.model.modality == "speech" else 0.0
        sync(device)
        dt = time.perf_counter() - t0
        return n / dt, secs / dt, first
    finally:
        L.close()


class ModelStep:
    """The trainer's single-engine step, without the engine (whose API is not this benchmark's)."""

    def __init__(self, recipe, device: torch.device):
        torch.manual_seed(recipe.seed)
        self.recipe, self.device = recipe, device
        self.student = build_model(recipe.model).to(device).train()
        self.teacher = EMATeacher(self.student.encoder).to(device)
        self.optimizer = build_optimizer(self.student, recipe.optim)
        self.pairs = ema_pairs(self.teacher.encoder, self.student.encoder)
        self.dtype = torch.bfloat16 if device.type == "cuda" else None  # precision auto: fp32 on AVX2 CPUs
        self.step_count = 0

    def __call__(self, batch: dict) -> None:
        obj = self.recipe.objective
        num_masked = batch["mask_BT"].sum()  # a device tensor: the division needs no host sync
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.student(batch)
            taps = self.teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT, num_taps=obj.top_k,
                                tap=obj.tap).taps
        target_ND = make_targets(taps, obj, out.padding_mask_BT)[out.mask_BT]
        loss = regression_loss(out.pred_ND, target_ND, obj) / num_masked
        loss.backward()
        if self.recipe.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.recipe.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        EMATeacher.update(*self.pairs, ema_decay(self.recipe.ema, self.step_count))
        self.step_count += 1


def model_rate(step: ModelStep, batches: list[dict], args) -> tuple[float, float]:
    """(samples/s, ms/step) of ``args.steps`` steps cycling over ``batches`` (on the device), after
    ``args.warmup`` steps."""
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync(step.device)
    n, t0 = 0, time.perf_counter()
    for i in range(args.steps):
        b = batches[i % len(batches)]
        step(b)
        n += rows(b)
    sync(step.device)
    dt = time.perf_counter() - t0
    return n / dt, 1e3 * dt / args.steps


# ============================================================================= main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="smaller micro-batches on CPU, few batches: a smoke run")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--workers", default=None,
                   help="DataLoader worker counts, comma-separated (default 0,1,2; --quick 0,1)")
    p.add_argument("--data", choices=("synthetic", "files"), default="synthetic")
    p.add_argument("--model", choices=("base", "small"), default=None, help="default: base on CUDA, small on CPU")
    p.add_argument("--stage-off", action="store_true", help="vision: also time data.device_stage=false")
    p.add_argument("--batches", type=int, default=8, help="timed input batches per measurement")
    p.add_argument("--steps", type=int, default=6, help="timed model steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches / steps first")
    p.add_argument("--repeats", type=int, default=1, help="repeats of each input timing (the median is printed)")
    p.add_argument("--main-threads", type=int, default=1,
                   help="torch threads of the main process while the input path is timed (the model step uses all)")
    p.add_argument("--images", type=int, default=512, help="--data files: JPEGs")
    p.add_argument("--clips", type=int, default=128, help="--data files: FLAC clips")
    p.add_argument("--text-chars", type=int, default=600_000, help="--data files: docstring characters")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra recipe override (every modality)")
    args = p.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("input_path: --device cuda, but torch sees no CUDA device")
    args.model = args.model or ("base" if args.device.type == "cuda" else "small")
    args.quick = args.quick and args.device.type == "cpu"  # a GPU turns the base micro-batches over quickly
    if args.quick:
        args.batches, args.steps, args.warmup = 2, 1, 1
        args.images, args.clips, args.text_chars = 96, 32, 200_000
    args.modalities = [m for m in args.modalities.split(",") if m]
    workers = [int(w) for w in (args.workers or ("0,1" if args.quick else "0,1,2")).split(",")]
    model_threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]

    tmp = tempfile.TemporaryDirectory(prefix="input-path-")
    if args.data == "files":
        t0 = time.perf_counter()
        data_sets = build_files(Path(tmp.name), args)
        print(f"[bench] data built in {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        data_sets = {m: ["data.train_shards=synthetic"] for m in args.modalities}

    input_rows, model_rows = [], []
    for m in args.modalities:
        recipe, micro, audio = recipe_for(m, data_sets[m] + args.overrides, args)
        micro_words = f"{audio / recipe.data.speech.sample_rate:.1f} s" if audio else str(micro)
        variants = [("on" if args.device.type == "cuda" and m == "vision" else "-", {})]
        if args.stage_off and m == "vision" and args.device.type == "cuda":
            variants.append(("off", {"device_stage": False}))
        torch.set_num_threads(args.main_threads)
        rates: dict[tuple[str, int], float] = {}
        loader_batches: list[dict] = []
        for stage, changes in variants:
            for w in workers:
                got = [input_rate(recipe, micro, audio, args.device, w, args, **changes) for _ in range(args.repeats)]
                rate, secs = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
                loader_batches = loader_batches or got[0][2]
                rates[stage, w] = rate
                per_batch = f"{1e3 * rows(loader_batches[0]) / rate:.0f}" if not audio else "-"
                input_rows.append(f"| {m} | {micro_words} | {stage} | {w} | {rate:.1f} | "
                                  f"{f'{secs:.1f}' if audio else '-'} | {per_batch} |")
                print(f"[bench] {m} input stage={stage} workers={w}: {rate:.1f} samples/s", flush=True)
        torch.set_num_threads(model_threads)
        step = ModelStep(recipe, args.device)
        real, step_ms = model_rate(step, loader_batches, args)
        L = make_loader(recipe, micro, audio, args.device, synthetic_on_device=True, train_shards="synthetic")
        synthetic = [next(L) for _ in range(max(2, args.warmup))]
        L.close()
        made, _ = model_rate(step, synthetic, args)
        del step
        stage0 = variants[0][0]
        one = rates.get((stage0, 1)) or max(rates[stage0, w] / max(w, 1) for w in workers)
        needed = math.ceil(real / one) if one > 0 else float("nan")
        precision = "bf16" if args.device.type == "cuda" else "fp32"
        model_rows.append(f"| {m} | {micro_words} | {args.model} | {precision} | "
                          f"{step_ms:.0f} | {real:.1f} | {made:.1f} | {one:.1f} | **{needed}** |")
        print(f"[bench] {m} model: {real:.1f} samples/s on loader batches, {made:.1f} on synthetic_on_device",
              flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    tmp.cleanup()

    load1 = os.getloadavg()[0]
    dev = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"\n{dev}; {os.cpu_count()} CPUs (1-min load average {load0:.1f} at start, {load1:.1f} at end); torch "
          f"{torch.__version__}; data {args.data}; base recipes' data settings and per-rank micro-batch"
          f"{' (--quick: smaller)' if args.quick else ''}; {args.batches} timed batches / {args.steps} timed steps "
          f"after {args.warmup} warm-up; main process {args.main_threads} thread(s) for the input path, "
          f"{model_threads} for the model\n")
    print("Input path (loader next() + to_device):\n")
    print("| modality | micro-batch | device stage | workers | samples/s | audio s/s | ms/batch |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(input_rows))
    print("\nModel step at the same micro-batch, batches already on the device:\n")
    print("| modality | micro-batch | model | precision | ms/step | samples/s (loader's batches) | "
          "samples/s (synthetic_on_device) | one worker's samples/s | workers needed |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(model_rows))


if __name__ == "__main__":
    main()
