"""Sharded EMA teacher: per-rank memory and EMA-update cost, 2 ranks against 1 rank.

For each engine (fsdp, deepspeed zero-3) and world size (1, 2) this runs a few training steps of a
ViT (dim 256, depth 6 by default) on synthetic data and prints:
- per-rank bytes of params + grads + optimizer state + teacher (the engine's memory report), and the
  2-rank / 1-rank ratio (target: <= 0.55);
- the EMA update's time against a flat fp32 ``lerp_`` over the same number of bytes, measured side
  by side in the same process on every step (target: <= 2x).

    python benchmarks/sharded_teacher.py [--steps 6] [--dim 256] [--depth 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from dist_harness import spawn  # noqa: E402


def worker(engine: str, overrides: list[str], repeats: int) -> dict:
    import scaling.trainer as trainer_mod
    from scaling.config import load_recipe
    from scaling.pretrain import run

    ema_times, flat_times = [], []
    original = trainer_mod.EMATeacher.update

    def timed_update(teacher_tensors, student_tensors, decay):
        # Side by side: the real fused update, and one flat fp32 lerp_ over the same element count.
        n = sum(t.numel() for t in teacher_tensors)
        flat_t, flat_s = torch.zeros(n), torch.ones(n)
        for _ in range(repeats):
            t0 = time.perf_counter()
            original(teacher_tensors, student_tensors, decay)
            t1 = time.perf_counter()
            flat_t.lerp_(flat_s, 1.0 - decay)
            t2 = time.perf_counter()
            ema_times.append(t1 - t0)
            flat_times.append(t2 - t1)

    trainer_mod.EMATeacher.update = staticmethod(timed_update)
    recipe = load_recipe(REPO / "recipes" / "vision" / "tiny.yaml", overrides + [f"engine.name={engine}"])
    result = run(recipe)
    rank = int(os.environ.get("RANK", 0))
    mem = {k.split("/")[-1].replace("_bytes", ""): v for k, v in result.memory.items() if f"/rank{rank}/" in k}
    return {"memory": mem, "ema_s": statistics.median(ema_times), "flat_s": statistics.median(flat_times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5, help="timed EMA repetitions per step")
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"train.max_steps={args.steps}", "train.precision=fp32", "tracking.enabled=false",
                "train.global_batch_size=8", "train.micro_batch_size=4", f"model.dim={args.dim}",
                f"model.depth={args.depth}", f"model.ffn_dim={4 * args.dim}", "model.heads=8", "objective.top_k=3",
                "checkpoint.every_steps=1000", "checkpoint.resume=never"]
        rows = []
        for engine, extra in (("fsdp", []), ("deepspeed", ["engine.zero_stage=3"])):
            per_world = {}
            for world in (1, 2):
                overrides = base + extra + [f"checkpoint.dir={tmp}/{engine}{world}",
                                            f"train.micro_batch_size={8 // world}"]
                per_world[world] = spawn(worker, engine, overrides, args.repeats, world_size=world)[0]
            rows.append((engine, per_world))

    print(f"\nViT dim {args.dim} depth {args.depth}, {args.steps} steps, fp32, CPU gloo; rank 0's figures\n")
    print("| engine | world | params | grads | optimizer | teacher | total | total vs 1 rank | "
          "EMA ms | flat lerp ms | EMA / flat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for engine, per_world in rows:
        one = sum(per_world[1]["memory"].values())
        for world, r in per_world.items():
            m = r["memory"]
            total = sum(m.values())
            print(f"| {engine} | {world} | {m['params'] / 2**20:.2f} MiB | {m['grads'] / 2**20:.2f} MiB | "
                  f"{m['optimizer'] / 2**20:.2f} MiB | {m['teacher'] / 2**20:.2f} MiB | {total / 2**20:.2f} MiB | "
                  f"{total / one:.3f} | {r['ema_s'] * 1e3:.3f} | {r['flat_s'] * 1e3:.3f} | "
                  f"{r['ema_s'] / r['flat_s']:.2f} |")


if __name__ == "__main__":
    main()
