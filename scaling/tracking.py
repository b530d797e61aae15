"""MLflow tracking from rank 0, and the run's ``run.json`` beside its checkpoints.

Where: ``MLFLOW_TRACKING_URI`` when it is set, else ``tracking.uri`` (default
``sqlite:///mlruns.db``). The environment wins so that a cluster can point every job at its
server without editing recipes (MLflow's own convention for the variable). A relative SQLite path
is made absolute before use, so the printed ``mlflow ui`` hint works from any directory; a SQLite
store keeps its artifacts in ``mlartifacts/`` beside the database. Jobs that start at once on one
fresh SQLite store take turns creating it (:func:`store_lock`).

What (docs/tracking.md has the full list):

- params: the flattened resolved recipe plus the world size and the batch split (``run.*``); tags:
  modality, size, recipe path, engine, ZeRO stage, world size, precision, device, plan;
- metrics on the trainer's cadence, asynchronously (tracking never stalls a step); the first
  charts are ``loss``, ``lr``, ``target_var``, ``pred_var`` and ``mfu``; the rest is grouped
  (``throughput/``, ``train/``, ``rank/``, ``data/``, ``memory/``);
- MLflow's own system metrics (``system/``: CPU, memory, disk, network; GPU when pynvml is
  installed), sampled every ``tracking.system_metrics_every_s``;
- artifacts: ``recipe.yaml``; at the end ``run.json``, ``plots/*.png`` (from the metric history, so
  a resumed run's plots cover all of it) and ``deepspeed_config.json`` under DeepSpeed.

A resumed run appends to its MLflow run (the run id is in the checkpoint). MLflow params cannot
change, so what the resumed run changed (any flattened recipe key, the world size, the split) is
recorded as tags ``resume/<step>/<key>`` = ``"old -> new"`` and as ``resume/step_<step>.txt``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from scaling.config import Recipe, TrackingConfig, flatten, to_yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

log = logging.getLogger("scaling.tracking")

RUN_JSON = "run.json"
RUN_JSON_FORMAT = 1
# Curves drawn at the end of a run: (file, title, metric keys).
PLOTS = [("plots/loss.png", "loss", ["loss"]),
         ("plots/variance.png", "target and prediction std (mean over dims)", ["target_var", "pred_var"]),
         ("plots/lr.png", "learning rate", ["lr"])]


# ----------------------------------------------------------------------------- where
def tracking_uri(configured: str) -> str:
    """The store a run logs to: ``MLFLOW_TRACKING_URI`` if set (it wins over ``tracking.uri``),
    else ``configured``; a relative SQLite path or a bare directory is made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not path.startswith("/"):
            return "sqlite:///" + str(Path(path).resolve())
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())  # a FileStore directory
    return uri


def set_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect on the environment: MLflow also exports
    the URI as ``MLFLOW_TRACKING_URI`` for subprocesses, which this process's next run (and every
    process it starts) would then take for the user's setting. Code here sets the URI only this way."""
    import mlflow

    user = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:"):
        return None
    path = urlparse(uri).path[1:] if uri.startswith("sqlite:///") else urlparse(uri).path
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str):
    """Around the first use of a store by this process: a fresh SQLite store is created by MLflow's
    schema migrations, which two processes running at once collide in (``sqlite3.OperationalError:
    duplicate column name``), and two first runs would both create the experiment. Under an exclusive
    lock on ``<database>.lock``, the second finds the store and the experiment made. Other stores
    (servers, databases) serialise this themselves."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from scaling.checkpoint.lock import exclusive

    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(db.with_name(db.name + ".lock")):
        yield


def artifact_root(uri: str) -> str | None:
    """Artifacts live next to a SQLite store; other stores keep their own default."""
    if not uri.startswith("sqlite:"):
        return None
    db = Path(urlparse(uri).path[1:] if uri.startswith("sqlite:///") else urlparse(uri).path)
    return (db.resolve().parent / "mlartifacts").as_uri()


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How a user opens the run: the server's page for an http(s) store, else an ``mlflow ui`` command."""
    if uri.startswith(("http://", "https://")):
        page = uri.rstrip("/")
        if experiment_id and run_id:
            page += f"/#/experiments/{experiment_id}/runs/{run_id}"
        return f"open {page}"
    return f"mlflow ui --backend-store-uri {uri}"


# ----------------------------------------------------------------------------- run.json
def read_run_json(directory: str | Path) -> dict | None:
    """The ``run.json`` of a ``checkpoint.dir``, or None when there is none (or it does not parse)."""
    path = Path(directory) / RUN_JSON
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exn:
        log.warning("%s: not valid JSON (%s); ignored", path, exn)
        return None
    return info if isinstance(info, dict) else None


def write_run_json(directory: str | Path, info: dict) -> Path:
    """Write ``run.json`` atomically (a reader sees the old file or the new one, never a part)."""
    path = Path(directory) / RUN_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_JSON}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def run_record(recipe: Recipe, summary: dict, *, tracker: "Tracker", checkpoint: Path | None, world_size: int,
               previous: dict | None) -> dict:
    """The content of ``run.json`` (schema in docs/tracking.md). ``summary``: Trainer.summary() of this
    segment; ``previous``: the run.json already there, whose segments a resumed run continues."""
    segment = {k: summary[k] for k in ("start_step", "step", "wall_time_s", "samples", "tokens")}
    segment["world_size"] = world_size
    # Fault handling (scaling/trainer.py): steps skipped for non-finite values, the step a signal stopped at.
    segment.update({k: summary[k] for k in ("skipped_steps", "skipped", "preempted_at") if k in summary})
    segments = []
    if previous and summary["start_step"] > 0 and previous.get("mlflow", {}).get("run_id") == tracker.run_id:
        segments = [s for s in previous.get("segments", []) if s.get("step", 0) <= summary["start_step"]]
    segments.append(segment)
    return {
        "format": RUN_JSON_FORMAT,
        "mlflow": {"run_id": tracker.run_id, "tracking_uri": tracker.uri if tracker.run_id else None,
                   "experiment": recipe.tracking.experiment if tracker.run_id else None,
                   "experiment_id": tracker.experiment_id},
        "checkpoint": str(checkpoint.resolve()) if checkpoint is not None else None,
        "step": summary["step"],
        "max_steps": recipe.train.max_steps,
        "modality": recipe.model.modality,
        "engine": recipe.engine.name,
        "zero_stage": recipe.engine.zero_stage if recipe.engine.name == "deepspeed" else None,
        "world_size": world_size,
        "precision": recipe.train.precision,
        "final": summary["final"],
        "throughput": {"samples_per_s": summary["samples_per_s"], "tokens_per_s": summary["tokens_per_s"],
                       "mfu": summary["mfu"]},
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "wall_time_s": summary["wall_time_s"],
        "total_wall_time_s": sum(s["wall_time_s"] for s in segments),
        "segments": segments,
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def record_run(recipe: Recipe, summary: dict, *, tracker: "Tracker", checkpoint: Path | None, world_size: int,
               deepspeed_config: dict | None = None) -> dict:
    """Rank 0 at the end of a run: write ``checkpoint.dir/run.json`` and log the end-of-run artifacts."""
    directory = Path(recipe.checkpoint.dir)
    info = run_record(recipe, summary, tracker=tracker, checkpoint=checkpoint, world_size=world_size,
                      previous=read_run_json(directory))
    write_run_json(directory, info)
    tracker.log_end(info, deepspeed_config=deepspeed_config)
    return info


def summary_lines(info: dict | None, checkpoint_dir: str | Path) -> list[str]:
    """The closing summary a user reads (rank 0): time, throughput, memory, loss, where things are."""
    if info is None:
        return []

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    t, fin = info["throughput"], info["final"]
    wall = datetime.timedelta(seconds=round(info["wall_time_s"]))
    mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
    peak = info["peak_memory_bytes"]
    lines = [f"done: {info['segments'][-1]['step'] - info['segments'][-1]['start_step']} steps to step "
             f"{info['step']}/{info['max_steps']} in {wall} wall (world size {info['world_size']}, {info['engine']}); "
             f"{num(t['samples_per_s'], '.1f')} samples/s, {num(t['tokens_per_s'], ',.0f')} tokens/s{mfu}; "
             f"peak memory {num(peak / 2**30 if peak is not None else None, '.2f')} GiB (largest rank)",
             f"final loss {num(fin.get('loss'), '.4f')}, target_var {num(fin.get('target_var'), '.3f')}, "
             f"pred_var {num(fin.get('pred_var'), '.3f')}, target rank {num(fin.get('target_rank'), '.1f')}",
             f"checkpoint: {info['checkpoint']}", f"run.json: {(Path(checkpoint_dir) / RUN_JSON).resolve()}"]
    m = info["mlflow"]
    if m["run_id"]:
        lines.append(f"MLflow run {m['run_id']} in {m['tracking_uri']} (experiment '{m['experiment']}'); view with: "
                     f"{ui_hint(m['tracking_uri'], m['experiment_id'], m['run_id'])}")
    return lines


# ----------------------------------------------------------------------------- the tracker
def run_params(recipe: Recipe, *, world_size: int, plan) -> dict[str, str]:
    """MLflow params: the flattened recipe, and what this job made of it (``run.*``)."""
    params = {k: str(v) for k, v in flatten(recipe).items()}
    params["run.world_size"] = str(world_size)
    if plan is not None:
        params["run.micro_batch_size"] = str(plan.micro_batch_size)
        params["run.accumulation"] = str(plan.accumulation)
    return params


def param_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """``key -> "old -> new"`` for every param that differs (``<unset>`` for a side without it)."""
    return {k: f"{old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


class Tracker:
    """A no-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, cfg: TrackingConfig, *, active: bool):
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.uri = tracking_uri(cfg.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, recipe: Recipe, run_id: str | None = None, *, recipe_path: str | Path | None = None,
              world_size: int = 1, plan=None, start_step: int = 0) -> None:
        """Open the run (a new one, or ``run_id`` of the checkpoint), log params or the changes."""
        if not self.active:
            return
        import mlflow

        set_tracking_uri(self.uri)
        with store_lock(self.uri):
            experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_root(self.uri))
            self.experiment_id = mlflow.set_experiment(self.cfg.experiment).experiment_id
        system = self.cfg.system_metrics_every_s > 0
        if system:
            # MLflow's default (10 s, one sample per point) leaves a short run with no system metric.
            mlflow.set_system_metrics_sampling_interval(self.cfg.system_metrics_every_s)
            mlflow.set_system_metrics_samples_before_logging(1)
        params = run_params(recipe, world_size=world_size, plan=plan)
        if run_id is not None:  # a resumed run continues its MLflow run
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
            changes = param_changes(run.data.params, params)
            if changes:
                mlflow.set_tags({f"resume/{start_step}/{k}": v for k, v in changes.items()})
                mlflow.log_text("".join(f"{k}: {v}\n" for k, v in changes.items()),
                                f"resume/step_{start_step:08d}.txt")
                mlflow.log_text(to_yaml(recipe), f"resume/step_{start_step:08d}_recipe.yaml")
        else:
            run = mlflow.start_run(run_name=self.cfg.run_name or None, log_system_metrics=system)
            mlflow.log_params(params)
            mlflow.log_text(to_yaml(recipe), "recipe.yaml")
        self.run_id = run.info.run_id
        tags = {"modality": recipe.model.modality, "engine": recipe.engine.name, "world_size": str(world_size),
                "precision": recipe.train.precision}
        if recipe_path is not None:
            tags.update(size=Path(recipe_path).stem, recipe=str(Path(recipe_path).resolve()))
        if recipe.engine.name == "deepspeed":
            tags["zero_stage"] = str(recipe.engine.zero_stage)
        if plan is not None:
            tags["plan"] = str(plan)
        mlflow.set_tags(tags)  # tags can change: a resumed run shows its current world size and plan

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and self.run_id is not None:
            import mlflow

            mlflow.log_metrics(metrics, step=step, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id is not None and tags:
            import mlflow

            mlflow.set_tags(tags)

    def hint(self) -> str:
        return ui_hint(self.uri, self.experiment_id, self.run_id)

    def log_end(self, run_info: dict, *, deepspeed_config: dict | None = None) -> None:
        """The end-of-run artifacts: run.json, the plots, the DeepSpeed config."""
        if not self.active or self.run_id is None:
            return
        import mlflow

        mlflow.flush_async_logging()  # the plots read the metric history back
        mlflow.log_dict(run_info, RUN_JSON)
        if deepspeed_config is not None:
            mlflow.log_dict(deepspeed_config, "deepspeed_config.json")
        try:
            self._log_plots()
        except Exception as exn:  # noqa: BLE001  (a plot must never fail a finished run)
            log.warning("plots not logged: %s", exn)

    def _log_plots(self) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display on a cluster node
        import matplotlib.pyplot as plt
        import mlflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        for path, title, keys in PLOTS:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            for key in keys:
                history = sorted(client.get_metric_history(self.run_id, key), key=lambda m: m.step)
                ax.plot([m.step for m in history], [m.value for m in history], label=key)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if keys[0] == "loss":
                ax.set_yscale("log")
            if len(keys) > 1:
                ax.legend()
            fig.tight_layout()
            mlflow.log_figure(fig, path)
            plt.close(fig)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            import mlflow

            mlflow.flush_async_logging()
            mlflow.end_run(status=status)
