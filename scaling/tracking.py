"""MLflow tracking, from rank 0 only.

Default store: ``sqlite:///mlruns.db`` in the working directory, with the
artifacts in ``mlartifacts/`` next to the database. Params are the flattened
resolved recipe; the recipe itself is an artifact; metrics are logged
asynchronously on the trainer's cadence so that tracking does not stall steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from scaling.config import Recipe, TrackingConfig, flatten, to_yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def artifact_root(uri: str) -> str | None:
    """Artifacts live next to a SQLite store; other stores keep their own default."""
    if not uri.startswith("sqlite:"):
        return None
    db = Path(urlparse(uri).path[1:] if uri.startswith("sqlite:///") else urlparse(uri).path)
    return (db.resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """A no-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, cfg: TrackingConfig, *, active: bool):
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.run_id: str | None = None

    def start(self, recipe: Recipe, run_id: str | None = None) -> None:
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.uri)
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_root(self.cfg.uri))
        mlflow.set_experiment(self.cfg.experiment)
        if run_id is not None:  # a resumed run continues its MLflow run
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(run_name=self.cfg.run_name or None)
            params = {k: str(v) for k, v in flatten(recipe).items()}
            mlflow.log_params(params)
            mlflow.log_text(to_yaml(recipe), "recipe.yaml")
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics(metrics, step=step, synchronous=False)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and tags:
            import mlflow

            mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            import mlflow

            mlflow.flush_async_logging()
            mlflow.end_run(status=status)
