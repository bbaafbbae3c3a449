"""mlflow tracking, on global rank 0 only.

Store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a local store in the run directory:
``sqlite:///<run.dir>/mlflow.db`` with full mlflow (browse it with
``mlflow ui --backend-store-uri sqlite:///<run.dir>/mlflow.db``), or a file store
``<run.dir>/mlruns`` where only mlflow-skinny is installed (no sqlalchemy, e.g. the GPU image).
A resumed run passes its saved run id and continues the same mlflow run.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def default_uri(run_dir: str) -> str:
    run_dir = str(pathlib.Path(run_dir).resolve())
    try:
        import sqlalchemy  # noqa: F401

        return f"sqlite:///{run_dir}/mlflow.db"
    except ImportError:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return pathlib.Path(run_dir, "mlruns").as_uri()


def resolve_uri(configured: str, run_dir: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)


class Tracker:
    """No-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, active: bool, uri: str, experiment: str) -> None:
        self.active, self.uri, self.run_id = active, uri, None
        if active:
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment)
            self._mlflow = mlflow

    def start(self, run_name: str, run_id: str | None = None) -> str | None:
        if not self.active:
            return None
        run = self._mlflow.start_run(run_id=run_id) if run_id else \
            self._mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        existing = self._mlflow.get_run(self.run_id).data.params
        new = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        if new:
            self._mlflow.log_params(new)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | pathlib.Path) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
