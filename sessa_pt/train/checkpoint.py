"""Atomic, complete, strictly loaded checkpoints.

Layout of ``<run.dir>/checkpoints/step_XXXXXXXX/``:
  ds/                DeepSpeed's engine state: model (per TP/PP rank), optimizer (per ZeRO
                     shard), LR scheduler
  rng/rank_N.pt      python, numpy, torch (and CUDA) RNG states of every rank
  trainer_state.json step, consumed samples (the data cursor), world layout, mlflow run id
  config.yaml        the resolved run config
  versions.json      package versions
  model.pt           the plain DecoderLM state dict (TP slices gathered, PP stages merged):
                     loadable for evaluation whatever the training layout
  COMPLETE           written last; a directory without it is ignored

Writes go to ``step_XXXXXXXX.tmp`` first; rank 0 renames it after every rank has finished, then
writes COMPLETE. A run killed mid-save leaves only a ``.tmp`` directory, which the next save
removes.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: pathlib.Path, step: int) -> pathlib.Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: pathlib.Path) -> pathlib.Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "deepspeed", "megatron-core", "sentencepiece", "webdataset", "mlflow",
                 "mlflow-skinny", "numpy", "triton", "sessa_pt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: pathlib.Path, step: int, engine, trainer_state: dict, config_yaml: str,
                    plain_state: dict | None, keep_last: int) -> pathlib.Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():          # an incomplete directory of the same step (killed renaming)
            shutil.rmtree(final)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        if plain_state is not None:
            torch.save(plain_state, tmp / "model.pt")
        _write_json(tmp / "trainer_state.json", trainer_state)
        (tmp / "config.yaml").write_text(config_yaml)
        _write_json(tmp / "versions.json", package_versions())
    dist.barrier()
    from sessa_pt.train.faults import maybe_kill

    maybe_kill("kill_in_save", step)
    if rank == 0:
        os.replace(tmp, final)
        with open(final / "COMPLETE", "w") as fh:
            fh.write(f"step {step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: pathlib.Path, engine) -> dict:
    """Restore engine state (strict) and this rank's RNG; returns trainer_state."""
    state = json.loads((path / "trainer_state.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag="ds", load_module_strict=True,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path}/ds")
    rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.is_file() and state.get("world_size") == dist.get_world_size():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def load_plain_model(path: str | pathlib.Path):
    """A DecoderLM from a checkpoint directory (or a run directory: its newest checkpoint),
    whatever parallel layout trained it. Returns (model, Config)."""
    from sessa_pt.config import load_config
    from sessa_pt.models.lm import DecoderLM

    path = pathlib.Path(path)
    if not (path / "COMPLETE").is_file():
        newest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path} is neither a complete checkpoint (no COMPLETE "
                                    "marker) nor a run directory with one")
        path = newest
    cfg = load_config(path / "config.yaml")
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True), strict=True)
    return model, cfg
