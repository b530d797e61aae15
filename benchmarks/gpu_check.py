"""CUDA check on one GPU: every engine trains every modality's tiny recipe for a few bf16 steps
through torchrun (NCCL), and a Base-size recipe's step time gives samples/s and an MFU estimate.

    python benchmarks/gpu_check.py                      # all checks
    python benchmarks/gpu_check.py --only throughput    # just the Base-size step time

Each run is a ``scaling.pretrain`` subprocess on synthetic data with MLflow off. Step time is the
progress bar's smoothed rate at the last step (``--steps`` x 3 steps for throughput), so start-up
and the first steps' allocations are left out. Synthetic 224-pixel images are made and augmented
on the CPU by ``data.num_workers`` processes, so the figure includes any data wait. MFU counts the
encoder's matmul FLOPs only (6 N per token for the student's forward and backward, 2 N for the
teacher's forward, N = encoder parameters; attention scores and the frontend are left out, so the
figure is a lower bound) against the GPU's dense bf16 peak given by ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("single", "ddp", "fsdp", "deepspeed")
MODALITIES = ("speech", "vision", "text")


def pretrain(recipe: str, overrides: list[str], workdir: Path) -> tuple[float, str, int]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "scaling.pretrain", str(ROOT / recipe)]
    sets = ["tracking.enabled=false", "train.device=cuda", f"checkpoint.dir={workdir}", "checkpoint.resume=never",
            "train.log_every=1000"] + overrides
    cmd += [a for s in sets for a in ("--set", s)]
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.stdout + proc.stderr, proc.returncode


def last_line(out: str, pattern: str) -> str:
    hits = [line for line in out.splitlines() if re.search(pattern, line)]
    return hits[-1].strip() if hits else "(none)"


def check_engines(steps: int, tmp: Path) -> bool:
    ok = True
    print("| modality | engine | result | last step |")
    print("|---|---|---|---|")
    for modality in MODALITIES:
        for engine in ENGINES:
            wall, out, rc = pretrain(f"recipes/{modality}/tiny.yaml",
                                     [f"engine.name={engine}", f"train.max_steps={steps}",
                                      f"checkpoint.every_steps={steps}", "train.precision=bf16"],
                                     tmp / f"{modality}-{engine}")
            step = last_line(out, r"\[scaling\] step \d+:")
            print(f"| {modality} | {engine} | {'ok' if rc == 0 else f'FAILED rc={rc}'} ({wall:.0f} s) | {step} |",
                  flush=True)
            if rc != 0:
                ok = False
                print("\n".join(out.splitlines()[-25:]), file=sys.stderr)
    return ok


@functools.cache  # one model build per recipe, not one per engine timed
def encoder_params(recipe: str) -> tuple[int, int]:
    """(encoder parameters, tokens per sample at the longest input) of a recipe's model."""
    sys.path.insert(0, str(ROOT))
    from scaling.config import load_recipe
    from scaling.models import build_model
    from scaling.models.speech import conv_output_length

    r = load_recipe(ROOT / recipe, require_data=False)
    model = build_model(r.model)
    n = sum(p.numel() for p in model.encoder.parameters())
    if r.model.modality == "vision":
        tokens = (r.model.vision.image_size // r.model.vision.patch_size) ** 2
    elif r.model.modality == "text":
        tokens = r.data.text.block_size
    else:
        tokens = conv_output_length(r.data.speech.max_samples, r.model.speech.conv_layers)
    return n, tokens


def tqdm_rate(out: str) -> float | None:
    """Steps per second of the last progress-bar update (tqdm's smoothed recent rate)."""
    rates = re.findall(r"([\d.]+)(it/s|s/it)", out)
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "it/s" else 1.0 / float(value)


def throughput(recipe: str, engine: str, batch: int, steps: int, peak_tflops: float, tmp: Path) -> None:
    sets = [f"engine.name={engine}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
            "train.precision=bf16", "checkpoint.every_steps=1000000", "data.train_shards=synthetic",
            "data.num_workers=12", f"train.max_steps={steps}"]
    _, out, rc = pretrain(recipe, sets, tmp / f"tp-{engine}")
    rate = tqdm_rate(out)
    if rc != 0 or rate is None:
        print(f"{recipe} {engine}: FAILED rc={rc}\n" + "\n".join(out.splitlines()[-25:]), flush=True)
        return
    step_s = 1.0 / rate
    n_params, tokens = encoder_params(recipe)
    flops = 8 * n_params * tokens * batch  # 6N student fwd+bwd + 2N teacher fwd, per token
    mfu = flops / step_s / (peak_tflops * 1e12)
    print(f"| {recipe} | {engine} | {batch} | {step_s * 1e3:.0f} ms | {batch / step_s:.0f} | "
          f"{n_params / 1e6:.1f} M | {mfu:.1%} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("engines", "throughput"), default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--tmp", default="/tmp/gpu_check")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}", flush=True)
    tmp = Path(args.tmp)
    ok = True
    if args.only in (None, "engines"):
        ok = check_engines(args.steps, tmp)
    if args.only in (None, "throughput"):
        print("\n| recipe | engine | batch | step | samples/s | encoder params | MFU (matmul lower bound) |")
        print("|---|---|---|---|---|---|---|")
        for engine in ("fsdp", "deepspeed"):
            throughput("recipes/vision/base.yaml", engine, 64, 3 * args.steps, args.peak_tflops, tmp)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
