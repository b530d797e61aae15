"""The GPU check, one prepared script: every engine on every modality, the no-host-sync rule, and the
samples/s and MFU of base-size steps per engine, model-only and with the real input path.

    python benchmarks/gpu_check.py                          # everything, bf16, on the GPU (~10 min on an H100)
    python benchmarks/gpu_check.py --only mfu --modalities vision --engines fsdp
    python benchmarks/gpu_check.py --device cpu --quick     # the script itself on CPU: tiny models, 4 steps

Parts (``--only``):

- ``engines``: each modality's tiny recipe trains ``--steps`` steps on single, ddp, fsdp and DeepSpeed
  ZeRO-1/2/3 through torchrun (NCCL on a GPU).
- ``sync``: the vision, speech and text tiny recipes under ``torch.cuda.set_sync_debug_mode("warn")``
  during the steps that are not log steps (from step 2 on): the number of synchronising CUDA calls
  they made, with the first distinct warnings (goal 0; fp16's GradScaler and DeepSpeed's own step do sync).
- ``mfu``: base recipes (``recipes/<modality>/base.yaml``) at ``--batch`` samples per micro-batch, bf16, on
  each of ``--engines``, with the GPU-side synthetic source (model only; ``data.synthetic_on_device:
  true``), then for the single engine with the CPU input path (synthetic samples made and
  augmented by ``data.num_workers`` workers, pinned, copied) and with ``engine.compile=true``.

Every figure is read from the run's files, not from its output: MLflow's ``throughput/samples_per_s`` and
``mfu`` metrics of the last log step (the second half of the steps, so start-up, compile and the first
steps' allocations are left out), found through ``checkpoint.dir/run.json``. MFU is the trainer's: model
FLOPs of student forward+backward and teacher forward including attention (scaling/flops.py) over the
device's dense peak for the run's precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("speech", "vision", "text")
ENGINES = {"single": ["engine.name=single"], "ddp": ["engine.name=ddp"], "fsdp": ["engine.name=fsdp"],
           "zero1": ["engine.name=deepspeed", "engine.zero_stage=1"],
           "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"]}


def pretrain(recipe: str, overrides: list[str], workdir: Path, *, device: str, sync_check: bool = False) -> tuple[int, str]:
    """One torchrun job of one process; returns (exit code, the tail of its output for a failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    sets = [f"train.device={device}", f"checkpoint.dir={workdir}", "checkpoint.resume=never",
            "checkpoint.every_steps=1000000"] + overrides
    module = [str(Path(__file__).resolve()), "--sync-child"] if sync_check else ["-m", "scaling.pretrain"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *module,
           str(ROOT / recipe)] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return proc.returncode, "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])


def last_metrics(workdir: Path, keys: tuple[str, ...]) -> dict[str, float | None]:
    """The last logged value of each metric of the run recorded in ``workdir/run.json``."""
    from mlflow.tracking import MlflowClient

    info = json.loads((workdir / "run.json").read_text())
    client = MlflowClient(info["mlflow"]["tracking_uri"])
    out = {}
    for key in keys:
        history = sorted(client.get_metric_history(info["mlflow"]["run_id"], key), key=lambda m: m.step)
        out[key] = history[-1].value if history else None
    return out


def check_engines(args, tmp: Path) -> bool:
    ok = True
    print("\n| modality | engine | result | wall | loss at the last step |")
    print("|---|---|---|---|---|")
    for modality in args.modalities:
        for engine in ENGINES:
            work = tmp / f"engines-{modality}-{engine}"
            t0 = time.perf_counter()
            rc, tail = pretrain(f"recipes/{modality}/tiny.yaml", ENGINES[engine] + [
                f"train.max_steps={args.steps}", f"train.precision={args.precision}", f"train.log_every={args.steps}",
                "tracking.enabled=true"], work, device=args.device)
            loss = last_metrics(work, ("loss",))["loss"] if rc == 0 else None
            print(f"| {modality} | {engine} | {'ok' if rc == 0 else f'FAILED rc={rc}'} | {time.perf_counter() - t0:.0f} s "
                  f"| {loss if loss is not None else 'n/a'} |", flush=True)
            if rc:
                ok = False
                print(tail, file=sys.stderr)
    return ok


def check_syncs(args, tmp: Path) -> bool:
    ok = True
    print("\n| modality | synchronising calls in non-log steps | first distinct warnings |")
    print("|---|---|---|")
    for modality in args.modalities:
        work = tmp / f"sync-{modality}"
        rc, tail = pretrain(f"recipes/{modality}/tiny.yaml", [
            "engine.name=single", f"train.max_steps={max(args.steps, 6)}", "train.log_every=3",
            f"train.precision={args.precision}", "tracking.enabled=false"], work, device=args.device, sync_check=True)
        if rc:
            print(f"| {modality} | FAILED rc={rc} | |")
            print(tail, file=sys.stderr)
            ok = False
            continue
        found = json.loads((work / "syncs.json").read_text())
        print(f"| {modality} | {found['count']} | {'; '.join(found['first'])[:300]} |", flush=True)
    return ok


def measure(args, tmp: Path) -> bool:
    ok = True
    print("\n| modality | engine | input | precision | micro-batch | samples/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    size = "tiny" if args.quick else "base"
    runs = [(m, e, "model only (GPU synthetic)", ["data.train_shards=synthetic", "data.synthetic_on_device=true"])
            for m in args.modalities for e in args.engines]
    runs += [(m, "single", f"CPU input path, {args.workers} workers",
              ["data.train_shards=synthetic", f"data.num_workers={args.workers}"]) for m in args.modalities]
    runs += [(m, "single", "model only, engine.compile",
              ["data.train_shards=synthetic", "data.synthetic_on_device=true", "engine.compile=true"])
             for m in args.modalities]
    steps = max(args.steps, 4)
    for modality, engine, label, extra in runs:
        work = tmp / f"mfu-{modality}-{engine}-{len(extra)}-{abs(hash(label)) % 1000}"
        rc, tail = pretrain(f"recipes/{modality}/{size}.yaml", ENGINES[engine] + extra + [
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"train.precision={args.precision}", f"train.max_steps={steps}", f"train.log_every={steps // 2}",
            "tracking.enabled=true", "tracking.system_metrics_every_s=0"], work, device=args.device)
        if rc:
            ok = False
            print(f"| {modality} | {engine} | {label} | {args.precision} | {args.batch} | FAILED rc={rc} | |", flush=True)
            print(tail, file=sys.stderr)
            continue
        m = last_metrics(work, ("throughput/samples_per_s", "mfu"))
        mfu = f"{m['mfu']:.1%}" if m["mfu"] is not None else "n/a (no peak known)"
        print(f"| {modality} | {engine} | {label} | {args.precision} | {args.batch} | "
              f"{m['throughput/samples_per_s']:.1f} | {mfu} |", flush=True)
    return ok


def sync_child(argv: list[str]) -> int:
    """``--sync-child``: scaling-pretrain with CUDA's sync debug mode on during non-log steps after the
    first; the warnings go to ``checkpoint.dir/syncs.json``."""
    import warnings

    import torch

    from scaling import pretrain
    from scaling.trainer import Trainer

    found: list[str] = []
    train_step = Trainer.train_step

    def watched(self, micro_batches, *, measure=False):
        if measure or self.step == 0 or not torch.cuda.is_available():
            return train_step(self, micro_batches, measure=measure)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_step(self, micro_batches, measure=measure)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))

    Trainer.train_step = watched
    rc = pretrain.main(argv)
    directory = next(a.split("=", 1)[1] for a in argv if a.startswith("checkpoint.dir="))
    distinct = list(dict.fromkeys(found))
    Path(directory, "syncs.json").write_text(json.dumps({"count": len(found), "first": distinct[:3]}))
    return rc


def main() -> int:
    if "--sync-child" in sys.argv:
        return sync_child([a for a in sys.argv[1:] if a != "--sync-child"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("engines", "sync", "mfu"), action="append",
                   help="repeatable; default: all three")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--modalities", default=",".join(MODALITIES), type=lambda s: s.split(","))
    p.add_argument("--engines", default="single,ddp,fsdp,zero2,zero3", type=lambda s: s.split(","),
                   help=f"for the mfu table; of {','.join(ENGINES)}")
    p.add_argument("--steps", type=int, default=20, help="steps per run (the mfu table reads the second half)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch of the mfu runs (one micro-batch per step)")
    p.add_argument("--workers", type=int, default=8, help="data.num_workers of the CPU-input-path row")
    p.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="tiny recipes, 4 steps, batch 4: a smoke of the script")
    p.add_argument("--tmp", default="/tmp/gpu_check")
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu --quick for a smoke of the script)")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.quick:
        args.steps, args.batch, args.workers = 4, 4, 1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, CUDA {torch.version.cuda}, precision {args.precision}", flush=True)
    tmp = Path(args.tmp)
    parts = args.only or ["engines", "sync", "mfu"]
    ok = True
    if "engines" in parts:
        ok &= check_engines(args, tmp)
    if "sync" in parts:
        ok &= check_syncs(args, tmp)
    if "mfu" in parts:
        ok &= measure(args, tmp)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
