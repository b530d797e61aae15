"""DDP gradient traffic per optimizer step: bytes all-reduced over the model's gradient bytes, with
gradient accumulation 1 and 4 (goal: 1.0 for both; before the engine's micro-batch context wrapped
the forward as well, accumulation 4 all-reduced every micro-batch, 4.0).

    python benchmarks/ddp_traffic.py                        # vision tiny, 2 gloo ranks on CPU
    python benchmarks/ddp_traffic.py --recipe recipes/speech/tiny.yaml --steps 4

Each rank counts DDP's bucket all-reduces with a comm hook (``DDPEngine.count_gradient_traffic``)
around DDP's own all-reduce, so the training itself is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def traffic_job(recipe: str, overrides: list[str], port: int | None = None) -> dict:
    """One DDP run on this rank that counts its gradient all-reduces (calls, bytes) and its gradient bytes.
    ``port``: a fresh MASTER_PORT for a second run in the same ranks."""
    from scaling.config import load_recipe
    from scaling.engines.ddp import DDPEngine
    from scaling.pretrain import run

    if port:
        os.environ["MASTER_PORT"] = str(port)
    counted = {}
    setup = DDPEngine.setup

    def counting_setup(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        counted["traffic"] = self.count_gradient_traffic()
        counted["grad_bytes"] = sum(p.numel() * p.element_size() for p in self._student.parameters()
                                    if p.requires_grad)

    DDPEngine.setup = counting_setup
    try:
        result = run(load_recipe(Path(recipe), ["engine.name=ddp"] + overrides))
    finally:
        DDPEngine.setup = setup
    return {"losses": [h.loss for h in result.history], "calls": counted["traffic"].calls,
            "bytes": counted["traffic"].bytes, "grad_bytes": counted["grad_bytes"], "steps": result.step}


def jobs(recipe: str, steps: int, global_batch: int, tmp: str, ports: list[int]) -> list[dict]:
    common = ["train.precision=fp32", f"train.max_steps={steps}", f"train.global_batch_size={global_batch}",
              "tracking.enabled=false", "checkpoint.every_steps=1000000", "checkpoint.resume=never"]
    per_rank = global_batch // 2
    return [traffic_job(recipe, common + [f"train.micro_batch_size={per_rank // acc}", f"checkpoint.dir={tmp}/acc{acc}"],
                        port)
            for acc, port in zip((1, 4), [None] + ports)]


def main() -> None:
    import tempfile

    from dist_harness import free_port, spawn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/vision/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=16, help="divisible by 8 (2 ranks x accumulation 4)")
    a = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as tmp:
        results = spawn(jobs, a.recipe, a.steps, a.global_batch, tmp, [free_port()])[0]
    print(f"recipe {Path(a.recipe).relative_to(ROOT) if a.recipe.startswith(str(ROOT)) else a.recipe}, 2 ranks, "
          f"{a.steps} steps, global batch {a.global_batch}")
    print("| accumulation | all-reduce calls per step | bytes all-reduced per step | gradient bytes | ratio |")
    print("|---|---|---|---|---|")
    for acc, r in zip((1, 4), results):
        print(f"| {acc} | {r['calls'] / r['steps']:.1f} | {r['bytes'] / r['steps']:,.0f} | {r['grad_bytes']:,} | "
              f"{r['bytes'] / r['steps'] / r['grad_bytes']:.3f} |")


if __name__ == "__main__":
    main()
