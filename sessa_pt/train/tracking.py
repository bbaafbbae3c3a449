"""mlflow tracking, on global rank 0 only.

Store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a local store in the run directory:
``sqlite:///<run.dir>/mlflow.db`` with full mlflow (browse it with
``mlflow ui --backend-store-uri sqlite:///<run.dir>/mlflow.db``), or a file store
``<run.dir>/mlruns`` where only mlflow-skinny is installed (no sqlalchemy, e.g. the GPU image).
A resumed run passes its saved run id and continues the same mlflow run.

Outages: an http(s) server is probed at start-up with ``tracking.probe_timeout_s`` (mlflow's
own client retries for minutes: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``=7 with exponential backoff
and a 120 s ``MLFLOW_HTTP_REQUEST_TIMEOUT`` per request), so an unreachable URI fails before any
model is built. During the run every call goes through a queue served by one background thread
that retries a failed call until it succeeds: training never waits for the server, the first
failure prints one warning, and the end of the run waits at most ``tracking.flush_timeout_s``
for the queue (the metrics are in ``train_log.jsonl`` whatever happens).
"""

from __future__ import annotations

import os
import pathlib
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

# The one place for mlflow's environment defaults (training, evaluation, reports, experiments).
MLFLOW_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def mlflow_env(uri: str | None = None, env: dict | None = None) -> dict:
    """``env`` (default: os.environ, changed in place) with our mlflow defaults where unset:
    telemetry off, and file stores allowed for a file URI (mlflow 3 refuses them otherwise)."""
    env = os.environ if env is None else env
    for k, v in MLFLOW_DEFAULTS.items():
        env.setdefault(k, v)
    if uri is not None and (uri.startswith("file:") or "://" not in uri):
        env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return env


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri``, with the defaults above applied."""
    mlflow_env(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


mlflow_env()


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer at start-up."""


def default_uri(run_dir: str) -> str:
    run_dir = str(pathlib.Path(run_dir).resolve())
    try:
        import sqlalchemy  # noqa: F401

        return f"sqlite:///{run_dir}/mlflow.db"
    except ImportError:
        uri = pathlib.Path(run_dir, "mlruns").as_uri()
        mlflow_env(uri)
        return uri


def resolve_uri(configured: str, run_dir: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)


def probe(uri: str, timeout_s: float) -> None:
    """Fail fast when an http(s) tracking server does not answer (any HTTP answer counts as
    reachable: a proxy or an auth error is for mlflow to report)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachable(
            f"the mlflow tracking server {uri} is unreachable ({reason}; no answer within "
            f"{timeout_s:g} s). Start it (mlflow server --host ... --port ...), fix "
            "tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false") from err


_STOP = object()


class Tracker:
    """No-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, active: bool, uri: str, experiment: str, probe_timeout_s: float = 5.0,
                 flush_timeout_s: float = 60.0) -> None:
        self.active, self.uri, self.run_id = active, uri, None
        self.experiment, self.flush_timeout_s = experiment, flush_timeout_s
        self.failures = 0
        self._warned = False
        self._monitor = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if active:
            # The background thread retries on its own; keep each mlflow request short so a
            # dead server does not hold a call (and the end of the run) for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            probe(uri, probe_timeout_s)

    def start(self, run_name: str, run_id: str | None = None) -> str | None:
        """Synchronous: creates (or reopens) the run; the server answered the probe."""
        if not self.active:
            return None
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        for attempt in range(3):     # a server that just started can be slow to answer
            try:
                if run_id:
                    self._client.update_run(run_id, status="RUNNING")
                else:
                    exp = self._client.get_experiment_by_name(self.experiment)
                    exp_id = exp.experiment_id if exp else self._client.create_experiment(
                        self.experiment)
                    run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
                self._existing_params = set(self._client.get_run(run_id).data.params)
                break
            except Exception as err:  # mlflow raises several types
                if attempt == 2:
                    raise TrackingUnreachable(f"the mlflow tracking server {self.uri} did not "
                                              f"create the run: {err}") from err
                time.sleep(2.0)
        self.run_id = run_id
        self._thread = threading.Thread(target=self._serve, name="sessa-mlflow", daemon=True)
        self._thread.start()
        return run_id

    def start_system_metrics(self, interval_s: float) -> None:
        """mlflow's own monitor (CPU, memory, disk, network; GPU through pynvml when present)
        samples every ``interval_s`` and logs from a thread of its own."""
        if not self.active:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s,
                                                 samples_before_logging=1,
                                                 resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 (psutil missing, an older mlflow...): optional
            print(f"[sessa_pt] warning: mlflow system metrics are off ({err})", flush=True)
            self._monitor = None

    # ---- the queue ----------------------------------------------------------------------
    def _submit(self, fn: str, *args, **kwargs) -> None:
        if self.active and self._thread is not None:
            self._queue.put((fn, args, kwargs))

    def _serve(self) -> None:
        delay = 1.0
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, kwargs = item
            while True:
                try:
                    getattr(self._client, fn)(*args, **kwargs)
                    delay = 1.0
                    break
                except Exception as err:  # noqa: BLE001 (any failure of the server: retry)
                    self.failures += 1
                    if not self._warned:
                        self._warned = True
                        print(f"[sessa_pt] warning: the tracking server {self.uri} failed "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
                              "training goes on, metrics are queued and retried in the "
                              "background (they are in train_log.jsonl too)",
                              file=sys.stderr, flush=True)
                    time.sleep(delay)
                    delay = min(30.0, delay * 2)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params mlflow does not hold yet (a resumed run keeps its first values; see
        ``log_config_change``)."""
        if not self.active:
            return
        from mlflow.entities import Param

        new = [Param(k, str(v)[:6000]) for k, v in params.items()
               if k not in self._existing_params]
        for i in range(0, len(new), 100):     # mlflow's batch limit is 100 params
            self._submit("log_batch", self.run_id, params=new[i:i + 100])

    def set_tag(self, key: str, value: str) -> None:
        self._submit("set_tag", self.run_id, key, str(value)[:5000])

    def log_config_change(self, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """A resume that changed settings: params cannot be overwritten, so the change is a
        tag and a ``config_change_step<N>`` param."""
        if not changes:
            return
        text = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changes.items()))
        self.set_tag(f"config_change_step{step}", text)
        if f"config_change_step{step}" not in getattr(self, "_existing_params", set()):
            from mlflow.entities import Param

            self._submit("log_batch", self.run_id,
                         params=[Param(f"config_change_step{step}", text[:6000])])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit("log_batch", self.run_id, metrics=batch)

    def log_artifact(self, path: str | pathlib.Path, artifact_path: str | None = None) -> None:
        if pathlib.Path(path).is_file():
            self._submit("log_artifact", self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active or self._thread is None:
            return
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # noqa: BLE001 (the monitor's last flush is best effort)
                print(f"[sessa_pt] warning: mlflow system metrics: {err}", flush=True)
        self._submit("set_terminated", self.run_id, status)
        self._queue.put(_STOP)
        self._thread.join(self.flush_timeout_s)
        if self._thread.is_alive():
            print(f"[sessa_pt] warning: {self._queue.qsize()} tracking call(s) did not reach "
                  f"{self.uri} within tracking.flush_timeout_s={self.flush_timeout_s:g}; the "
                  "run's metrics are in train_log.jsonl", file=sys.stderr, flush=True)
        self._thread = None
