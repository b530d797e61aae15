"""Training data loader throughput: samples/s per modality and worker count, and images against ImageFolder.

Builds real-ish data into a work folder (a temp dir unless ``--workdir``), then times ``build_loader``
exactly as the trainer drives it (one rank, base recipe data/model settings, a per-rank micro-batch):

- vision: ~500x375 JPEGs (random crops of scikit-learn's two sample photos, ImageNet-like sizes) in
  class sub-folders, turned into shards by ``scaling-shards image``; the SAME folder is also read by
  ``torchvision.datasets.ImageFolder`` + a torch DataLoader with the same v2 transforms, batch size and
  workers, timed side by side (interleaved) in the same run -> ratio ours / ImageFolder;
- speech: 5-20 s clips (LibriSpeech's mean is 12.4 s) of synthetic voiced audio written as FLAC by
  soundfile, -> ``scaling-shards audio``;
- text: the standard library's docstrings -> sentencepiece tokenizer + shards (the demo's builder).

``--demo-db`` reads a finished demo's MLflow runs (experiments scaling-demo-<modality>) and prints the
mean ``data/wait_share`` the trainer logged, against the 5% target.

    python benchmarks/data_loader.py [--quick] [--workers 1,2] [--batches 20] [--demo-db sqlite:///demo/mlruns.db]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.config import load_recipe  # noqa: E402
from scaling.data import build_loader  # noqa: E402
from scaling.data.build import shards_main  # noqa: E402

MODALITIES = ("vision", "speech", "text")
DATA_WAIT_TARGET = 0.05


# ============================================================================= data
def build_image_folder(root: Path, count: int, seed: int = 0) -> Path:
    """JPEGs at ImageNet-like sizes (long side 375-500, quality 90) in 10 class sub-folders.

    Decode and resize cost scale with pixels, so realistic sizes matter more than content; the two
    photos bundled with scikit-learn (427x640) are real images available offline."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        H, W = photo.shape[:2]
        h, w = int(rng.integers(H // 2, H + 1)), int(rng.integers(W // 2, W + 1))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        img = Image.fromarray(photo[top : top + h, left : left + w])
        long_side = int(rng.integers(375, 501))
        scale = long_side / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img{i:05d}.jpg", quality=90)
    return root


def build_audio_folder(root: Path, count: int, sr: int = 16000, seed: int = 0) -> Path:
    """Voiced, speech-like clips: a gliding pitch with 8 harmonics, a 4 Hz syllable envelope, pauses
    and a noise floor. FLAC size and decode time depend on the signal, so pure noise or pure tones
    would be unrealistic in opposite directions."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.uniform(5.0, 20.0) * sr)
        t = np.arange(n) / sr
        f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voiced = sum(np.sin(k * phase) / k for k in range(1, 9))
        syllables = np.sin(np.pi * rng.uniform(3, 5) * t) ** 2
        envelope = syllables * (np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6)) > -0.5)  # ~1 s pauses
        audio = 0.2 * voiced * envelope + 0.005 * rng.standard_normal(n)
        sf.write(root / f"clip{i:05d}.flac", audio.astype(np.float32), sr, subtype="PCM_16")
    return root


def shard(kind: str, src: Path, out: Path, per_shard: int) -> str:
    """The project's shard tool (``scaling-shards``); returns the brace spec of the shard set."""
    argv = [kind, str(src), str(out), "--no-progress", "--overwrite", "--samples-per-shard", str(per_shard)]
    if shards_main(argv) != 0:
        raise SystemExit(f"scaling-shards {kind} failed")
    tars = sorted(out.glob("train-*.tar"))
    return str(out / f"train-{{000000..{len(tars) - 1:06d}}}.tar")


def build_all(work: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """Recipe overrides per modality that point base.yaml at the benchmark's shards."""
    overrides: dict[str, list[str]] = {}
    if "vision" in args.modalities:
        folder = build_image_folder(work / "images", args.images)
        overrides["vision"] = [f"data.train_shards={shard('image', folder, work / 'vision', 256)}"]
    if "speech" in args.modalities:
        folder = build_audio_folder(work / "audio", args.clips)
        overrides["speech"] = [f"data.train_shards={shard('audio', folder, work / 'speech', 64)}"]
    if "text" in args.modalities:
        from scaling.data.demo_sets import build_text_demo

        info = build_text_demo(str(work / "text"), vocab_size=1000, max_chars=args.text_chars)
        # The demo's 1k vocabulary instead of base's 50k: the loader's cost does not depend on it.
        overrides["text"] = [f"data.train_shards={info['train_shards']}", f"data.text.tokenizer={info['tokenizer']}",
                             f"model.text.vocab_size={info['vocab_size']}"]
    return overrides


# ============================================================================= pipelines
def ours(modality: str, overrides: list[str], workers: int, batch: int) -> tuple[Iterator, Callable[[], None]]:
    recipe = load_recipe(REPO / "recipes" / modality / "base.yaml", overrides + [f"data.num_workers={workers}"])
    loader = build_loader(recipe.data, recipe.model, recipe.masking, seed=recipe.seed, rank=0, world_size=1,
                          micro_batch_size=batch)
    return loader, loader.close


def _decode_rgb(path: str) -> torch.Tensor:
    # Module level (picklable); the same libjpeg-turbo decoder as our loader (torchvision.io).
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(path, mode=ImageReadMode.RGB)


def image_folder(root: Path, workers: int, batch: int, decoder: str) -> tuple[Iterator, Callable[[], None]]:
    """ImageFolder + DataLoader with base.yaml's augmentation, as a torch user would write it."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    recipe = load_recipe(REPO / "recipes" / "vision" / "base.yaml", require_data=False)
    dc, size = recipe.data.vision, recipe.model.vision.image_size
    steps = [v2.PILToTensor()] if decoder == "pil" else []
    transform = v2.Compose(steps + [
        v2.RandomResizedCrop((size, size), scale=tuple(dc.crop_scale), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(dc.mean, dc.std),
    ])
    kwargs = {} if decoder == "pil" else {"loader": _decode_rgb}
    dl = torch.utils.data.DataLoader(ImageFolder(str(root), transform=transform, **kwargs), batch_size=batch,
                                     shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0)

    def forever() -> Iterator:
        while True:  # epochs back to back, as our loader's stream
            yield from dl

    it = forever()
    return it, it.close


def timed(make: Callable[[], tuple[Iterator, Callable[[], None]]], warmup: int, batches: int) -> float:
    """samples/s over ``batches`` batches after ``warmup`` (worker start-up and our shuffle-buffer fill
    happen once per run, not per step, so they are left out)."""
    it, close = make()
    try:
        for _ in range(warmup):
            next(it)
        n, t0 = 0, time.perf_counter()
        for _ in range(batches):
            b = next(it)
            n += (b["sample_id_B"] if isinstance(b, dict) else b[0]).shape[0]
        return n / (time.perf_counter() - t0)
    finally:
        close()


# ============================================================================= demo runs
def demo_wait(uri: str) -> list[str]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows = []
    for m in MODALITIES:
        exp = client.get_experiment_by_name(f"scaling-demo-{m}")
        runs = [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                                         max_results=1)
        if not runs:
            rows.append(f"| {m} | no run | | | | | |")
            continue
        run = runs[0]
        hist = sorted(client.get_metric_history(run.info.run_id, "data/wait_share"), key=lambda x: x.step)
        vals = [h.value for h in hist]  # one value per logged step: that step's data wait / step time
        mean = statistics.fmean(vals)
        rows.append(f"| {m} | {run.info.run_id[:8]} | {run.data.params.get('data.num_workers', '?')} | {len(vals)} | "
                    f"{100 * mean:.2f}% | {100 * statistics.median(vals):.2f}% | "
                    f"{'yes' if mean < DATA_WAIT_TARGET else 'NO'} |")
    return rows


# ============================================================================= main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small data, few batches: a smoke run (< 1 min)")
    p.add_argument("--workdir", default=None, help="build the data here (default: a temp dir, removed)")
    p.add_argument("--reuse", action="store_true", help="with --workdir: reuse the data a previous run built there")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts (comma-separated)")
    p.add_argument("--batch", default="vision=32,speech=8,text=16", help="per-rank micro-batch per modality")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is printed")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--text-chars", type=int, default=1_000_000, help="docstring characters for the text set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra recipe override for our loader (every modality), e.g. a new data.* key")
    p.add_argument("--main-threads", type=int, default=1,
                   help="torch threads of the main process (default 1, as the demo launches ranks)")
    p.add_argument("--no-pil", action="store_true", help="skip the ImageFolder row with PIL decoding")
    p.add_argument("--demo-db", default=None, metavar="URI", help="sqlite:///path/mlruns.db of a scaling-demo run")
    args = p.parse_args()
    if args.quick:
        args.images, args.clips, args.text_chars = 128, 48, 200_000
        args.batches, args.warmup, args.repeats = 4, 1, 1
    args.modalities = [m for m in args.modalities.split(",") if m]
    workers = [int(w) for w in args.workers.split(",")]
    batch = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(","))}

    # Our loader collates in the main process. With 2 intra-op threads next to busy workers on 2 cores
    # the collate spin-waits (measured: about half the throughput), so pin it like the demo does
    # (OMP_NUM_THREADS=1). DataLoader workers always run 1 thread, ours and ImageFolder's alike.
    torch.set_num_threads(args.main_threads)
    load0 = os.getloadavg()[0]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="loader-bench-")
    work = Path(args.workdir or tmp.name)
    t0 = time.perf_counter()
    saved = work / "overrides.json"
    if args.reuse and saved.exists():  # skip the build when timing the same data again
        overrides = json.loads(saved.read_text())
    else:
        overrides = build_all(work, args)
        saved.write_text(json.dumps(overrides))
    print(f"[bench] data ready in {time.perf_counter() - t0:.1f} s under {work}", flush=True)

    rows = []
    for m in args.modalities:
        B = batch[m]
        for w in workers:
            pipes: dict[str, Callable] = {"ours (build_loader)": lambda: ours(m, overrides[m] + args.overrides, w, B)}
            if m == "vision":
                pipes["ImageFolder (torchvision.io decode)"] = lambda: image_folder(work / "images", w, B, "tv")
                if not args.no_pil:
                    pipes["ImageFolder (PIL, its default)"] = lambda: image_folder(work / "images", w, B, "pil")
            # Interleaved repeats: drift on a shared box hits every pipeline alike.
            rates: dict[str, list[float]] = {k: [] for k in pipes}
            for _ in range(args.repeats):
                for name, make in pipes.items():
                    rates[name].append(timed(make, args.warmup, args.batches))
            med = {k: statistics.median(v) for k, v in rates.items()}
            base = med["ours (build_loader)"]
            for name, r in med.items():
                ratio = "" if name.startswith("ours") or m != "vision" else f"{base / r:.2f}"
                rows.append(f"| {m} | {name} | {w} | {B} | {r:.1f} | {1e3 * B / r:.0f} | {ratio} |")
            print(f"[bench] {m} workers={w} done", flush=True)

    load1 = os.getloadavg()[0]
    print(f"\n{os.cpu_count()} CPUs (1-min load average {load0:.1f} at start, {load1:.1f} at end), "
          f"torch {torch.__version__}, main process {args.main_threads} thread(s); {args.batches} timed batches after "
          f"{args.warmup} warm-up, median of {args.repeats} interleaved repeats; base recipes' data settings, "
          "one rank\n")
    print("| modality | loader | workers | micro-batch | samples/s | ms/batch | ours / this |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if "vision" in args.modalities:
        print("\nvision: base.yaml's 224x224 RandomResizedCrop (bicubic, antialias) + flip + float + normalize,"
              "\non ~500x375 JPEGs. Ours also reads tar shards and draws a block mask per sample;"
              "\nImageFolder reads the same JPEGs from the folder they were sharded from.")
    if args.demo_db:
        print(f"\nDemo data-wait share (trainer metric data/wait_share, target < {DATA_WAIT_TARGET:.0%}), "
              f"{args.demo_db}\n")
        print("| modality | run | workers | logged steps | mean data_wait_share | median | mean < 5% |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(demo_wait(args.demo_db)))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
