"""What the evaluation commands share: loading a trained checkpoint on a device, text tables,
JSON output, and logging results into the training run's mlflow record.

A checkpoint argument is a checkpoint directory (``<run.dir>/checkpoints/step_XXXXXXXX``) or a
run directory (its newest complete checkpoint). The model comes from the checkpoint's
``model/*.safetensors`` (the plain model's weights) through
:func:`sessa_pt.train.checkpoint.load_plain_model`, which verifies them against the checkpoint's
manifest first (a damaged file is refused by name), so any tensor / pipeline / data-parallel
layout and ZeRO stage that trained it evaluates the same way.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Loaded:
    model: torch.nn.Module
    cfg: Any                       # sessa_pt.config.Config
    checkpoint: pathlib.Path       # the resolved checkpoint directory
    step: int                      # its training step
    device: torch.device
    trainer_state: dict[str, Any]


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint directory ``path`` names (itself, or a run directory's newest one)."""
    from sessa_pt.train.checkpoint import latest_checkpoint

    p = pathlib.Path(path)
    if (p / "COMPLETE").is_file():
        return p
    newest = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
    if newest is None:
        raise FileNotFoundError(f"{p} is neither a complete checkpoint (no COMPLETE marker) nor "
                                "a run directory with one")
    return newest


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_sessa_impl(model: torch.nn.Module, impl: str) -> None:
    """Switch every Sessa mixer's feedback implementation (same parameters, same math)."""
    from sessa_pt.models.sessa import SessaMixer

    for m in model.modules():
        if isinstance(m, SessaMixer):
            m.impl = impl


def load_model(path: str | pathlib.Path, device: str = "auto", dtype: str = "auto",
               sessa_impl: str | None = None) -> Loaded:
    """Load a checkpoint for evaluation. ``dtype`` auto: float32 (bf16 autocast is left to the
    caller). A Triton-trained Sessa model on a machine without CUDA falls back to the chunked
    feedback solve unless ``sessa_impl`` says otherwise."""
    from sessa_pt.train.checkpoint import load_plain_model

    ckpt = resolve_checkpoint(path)
    model, cfg = load_plain_model(ckpt)
    dev = pick_device(device)
    impl = sessa_impl or (cfg.model.sessa.impl if dev.type == "cuda" or
                          cfg.model.sessa.impl != "triton" else "chunked")
    set_sessa_impl(model, impl)
    cfg.model.sessa.impl = impl
    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "float64": torch.float64,
                   "bfloat16": torch.bfloat16}[dtype]
    model = model.to(device=dev, dtype=torch_dtype).eval()
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    step = int(state.get("step", _step_from_name(ckpt)))
    return Loaded(model, cfg, ckpt, step, dev, state)


def _step_from_name(ckpt: pathlib.Path) -> int:
    name = ckpt.name
    return int(name.split("_", 1)[1]) if name.startswith("step_") else 0


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context otherwise."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A fixed-width text table (floats with 4 decimals)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def write_json(path: str | pathlib.Path, obj: dict[str, Any]) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")


def checkpoint_tracking(loaded: Loaded) -> tuple[str | None, str | None]:
    """(mlflow run id, tracking uri) recorded by the trainer for this checkpoint's run."""
    run_id = loaded.trainer_state.get("mlflow_run_id")
    uri = None
    for name in ("summary.json", "status.json"):
        f = loaded.checkpoint.parent.parent / name
        if f.is_file():
            uri = json.loads(f.read_text()).get("tracking_uri") or uri
            if uri:
                break
    return run_id, uri


class ResultLogger:
    """Logs evaluation results into an existing mlflow run (normally the training run), or does
    nothing when no run id is given. ``run_id='auto'`` takes the run id the trainer saved in the
    checkpoint and the tracking URI from the run directory's summary.json/status.json."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, loaded: Loaded) -> None:
        self.client = None
        self.run_id = run_id
        if not run_id:
            return
        uri = tracking_uri
        if run_id == "auto":
            self.run_id, saved_uri = checkpoint_tracking(loaded)
            uri = uri or saved_uri
            if not self.run_id:
                raise SystemExit(f"--mlflow-run-id auto: {loaded.checkpoint} records no mlflow "
                                 "run id (was tracking disabled?)")
        from sessa_pt.train.tracking import mlflow_client

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise SystemExit("--mlflow-run-id needs --tracking-uri (or MLFLOW_TRACKING_URI)")
        self.uri = uri
        self.client = mlflow_client(uri)
        self.client.get_run(self.run_id)     # fail early on a wrong id or store

    @property
    def active(self) -> bool:
        return self.client is not None

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def curve(self, key: str, xs: list[int], ys: list[float]) -> None:
        """A curve as one metric's history: the x value (a length, a lag) is the step."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(y), now, int(x)) for x, y in zip(xs, ys, strict=True)
                 if y is not None and math.isfinite(float(y))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def artifact(self, path: str | pathlib.Path, subdir: str = "eval") -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), subdir)
