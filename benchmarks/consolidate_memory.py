"""Peak memory of ``scaling-convert consolidate`` against the bytes it writes, for a ViT-B checkpoint
(recipes/vision/base.yaml: 86M parameters, student and teacher in fp32) from fsdp and from
DeepSpeed ZeRO-3 on 2 ranks (gloo, CPU).

Each checkpoint comes from one training step of the real recipe (``scaling-pretrain`` under torchrun).
Then two fresh processes per checkpoint, side by side:
- ``baseline``: the same imports, and the checkpoint opened (metadata and the name/shape index of
  both parts) without reading a tensor: the fixed overhead;
- ``consolidate``: ``consolidate(CKPT, OUT, part="both")``.
Each writes its own peak RSS (``ru_maxrss``) to a JSON file, which this script reads. It prints the
model bytes (the tensor bytes written), the largest tensor, both peaks, and
``(consolidate peak - baseline peak) / model bytes`` (goal: at most 0.3; the whole model in memory
would be at least 1.0).

    python benchmarks/consolidate_memory.py [--workdir /tmp/consolidate-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
from scaling.checkpoint import open_parts
from scaling.checkpoint.consolidate import consolidate
ckpt, out, mode, result = sys.argv[1:5]
_, _, sources = open_parts(ckpt)
infos = {{f"{{part}}.{{k}}": v.nbytes for part, source in sources.items() for k, v in source.infos.items()}}
del sources
if mode == "consolidate":
    consolidate(ckpt, out, part="both")
json.dump({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "model_bytes": sum(infos.values()), "largest": max(infos.values())}}, open(result, "w"))
"""


def make_checkpoint(workdir: Path, engine: str) -> Path:
    ckpt_dir = workdir / engine
    overrides = ["train.max_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1", "train.precision=fp32",
                 "train.device=cpu", "data.train_shards=synthetic", "data.num_workers=0", "tracking.enabled=false",
                 f"checkpoint.dir={ckpt_dir}", "checkpoint.resume=never", "checkpoint.every_steps=1"]
    overrides += ["engine.name=deepspeed", "engine.zero_stage=3"] if engine == "zero3" else ["engine.name=fsdp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "scaling.pretrain", str(REPO / "recipes/vision/base.yaml")] + sum([["--set", o] for o in overrides], [])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=str(REPO))
    subprocess.run(cmd, check=True, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    return ckpt_dir


def measure(ckpt: Path, workdir: Path, mode: str) -> dict:
    result = workdir / f"{ckpt.name}-{mode}.json"
    out = workdir / f"{ckpt.name}.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(ckpt), str(out), mode, str(result)],
                   check=True, env=env)
    out.unlink(missing_ok=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="consolidate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'engine':8} {'model MB':>9} {'largest MB':>10} {'baseline MB':>11} {'peak MB':>8} "
          f"{'(peak-base)/model':>17} {'peak/model':>10}")
    try:
        for engine in ("fsdp", "zero3"):
            ckpt = make_checkpoint(workdir, engine)
            base, cons = measure(ckpt, workdir, "baseline"), measure(ckpt, workdir, "consolidate")
            model = cons["model_bytes"]
            print(f"{engine:8} {model / 1e6:9.1f} {cons['largest'] / 1e6:10.1f} {base['peak_rss'] / 1e6:11.1f} "
                  f"{cons['peak_rss'] / 1e6:8.1f} {(cons['peak_rss'] - base['peak_rss']) / model:17.3f} "
                  f"{cons['peak_rss'] / model:10.3f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
