"""A real single-process CPU training run for tests that need a trained checkpoint and its
mlflow run (evaluation, export, harness)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_single_process(args: list[str], run_dir: pathlib.Path, uri: str) -> dict:
    """Run ``python -m sessa_pt.train ARGS run.dir=RUN_DIR tracking.uri=URI`` from the repo
    root; returns the run's summary.json (the run must succeed)."""
    cmd = [sys.executable, "-m", "sessa_pt.train", *args, f"run.dir={run_dir}",
           f"tracking.uri={uri}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((pathlib.Path(run_dir) / "summary.json").read_text())
