"""The resumable state of a ``tokenize`` run, saved after each finished shard.

A checkpoint is taken at a document boundary: the next document to read, each split's finished
shards, per-source counts, and the tokens not yet in a finished shard. Pending tokens go to
generation-numbered ``.npy`` files written before ``state.json`` is atomically replaced, so the
state on disk always points at complete files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sessa_pt.data.manifest import ShardInfo

STATE_DIR = ".tokenize_state"


@dataclass
class SplitState:
    shards: list[ShardInfo] = field(default_factory=list)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    docs: int = 0

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass
class RunState:
    fingerprint: str
    next_doc: int = 0
    generation: int = 0
    splits: dict[str, SplitState] = field(default_factory=dict)


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def save_state(out: Path, state: RunState, pending: dict[str, np.ndarray]) -> None:
    """Write pending token arrays, then atomically point ``state.json`` at them."""
    directory = state_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    state.generation += 1
    for split, tokens in pending.items():
        target = directory / f"pending-{state.generation}-{split}.npy"
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, tokens.astype(np.uint32), allow_pickle=False)
        os.replace(tmp, target)
    data: dict[str, Any] = asdict(state)
    data["pending_splits"] = sorted(pending)
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, directory / "state.json")
    for old in directory.glob("pending-*.npy"):
        if not old.name.startswith(f"pending-{state.generation}-"):
            old.unlink(missing_ok=True)


def load_state(out: Path) -> tuple[RunState, dict[str, np.ndarray]] | None:
    """The last saved state and its pending tokens, or ``None`` if there is none."""
    path = state_dir(out) / "state.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    pending_splits = data.pop("pending_splits")
    try:
        splits = {
            name: SplitState(shards=[ShardInfo(**s) for s in split["shards"]],
                             sources=split["sources"], docs=split["docs"])
            for name, split in data.pop("splits").items()
        }
    except TypeError as err:  # written by a version with another shard format
        raise ValueError(f"{out} holds an interrupted run of another shard format version "
                         f"({err}); pass --overwrite to start again") from err
    state = RunState(splits=splits, **data)
    pending = {
        split: np.load(state_dir(out) / f"pending-{state.generation}-{split}.npy")
        for split in pending_splits
    }
    return state, pending
