"""The run directory's bookkeeping, written by global rank 0 (errors: by the failing rank).

  LOCK               host, pid and start time of the live run that owns the directory
  status.json        state (running | finished | stopped | failed), step, mlflow run id,
                     and on failure the first failing rank's message
  summary.json       the final state, checkpoint and validation numbers (strict JSON)
  train_log.jsonl    one JSON record per optimizer step
  config.yaml        the resolved config of the current launch (the previous one as
                     config.yaml.prev when a resume changed settings)
  error.txt          the first failing rank's error and traceback
  spikes.jsonl       loss spikes: step, loss, running mean and the batch's sample ids

Every JSON file is strict: NaN and infinity are written as null.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import socket
import time
import traceback
from typing import Any

import yaml

LOCK = "LOCK"


class RunDirError(ValueError):
    """A run directory that this launch must not use; the message says what to do."""


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False, default=str)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, owned by another user
        return True
    return True


class RunDir:
    def __init__(self, path: str | pathlib.Path, rank: int) -> None:
        self.path = pathlib.Path(path)
        self.rank = rank
        self.lock_path = self.path / LOCK
        self.owns_lock = False        # rank 0 took the lock
        self.ours = False             # every rank: this run holds the lock

    # ---- ownership -----------------------------------------------------------------------
    def lock_owner(self) -> dict | None:
        try:
            return json.loads(self.lock_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": "?"}

    def live_owner(self) -> dict | None:
        """The lock's owner if it is a live process (or one on another host we cannot check)."""
        owner = self.lock_owner()
        if owner is None:
            return None
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"])):
            return None
        return owner

    def _refuse_live(self, owner: dict) -> None:
        raise RunDirError(
            f"run.dir {self.path} is in use by a live run: pid {owner.get('pid')} on host "
            f"{owner.get('host')} (started {owner.get('started')}). Wait for it to finish, stop "
            f"it (touch {self.path / 'STOP'} or send it SIGTERM), or choose another run.dir. If "
            f"that process is gone, delete {self.lock_path}")

    def acquire_lock(self) -> list[str]:
        """Take the lock (rank 0); returns warnings. A lock of a dead process on this host is
        taken over; a live owner is refused with its host and pid."""
        warnings = []
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(
                  timespec="seconds")}
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.live_owner()
                if owner is not None:
                    self._refuse_live(owner)
                stale = self.lock_owner()
                warnings.append(f"taking over the stale lock of pid {stale.get('pid')} on "
                                f"{stale.get('host')} (that process no longer runs)")
                self.lock_path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self.owns_lock = True
            return warnings
        raise RunDirError(f"could not take the lock {self.lock_path}: another launch took it "
                          "at the same time")

    def release_lock(self) -> None:
        if self.owns_lock:
            owner = self.lock_owner()
            if owner and owner.get("pid") == os.getpid():
                self.lock_path.unlink(missing_ok=True)
            self.owns_lock = False

    def prepare(self, resume: bool, overwrite: bool, has_checkpoints: bool) -> list[str]:
        """Rank 0, before anything is built: refuse a live owner, refuse to start over on old
        checkpoints unless ``overwrite`` (which moves the old directory aside), take the lock.
        Returns messages for the log."""
        notes = []
        if self.path.exists():
            owner = self.live_owner()
            if owner is not None:
                self._refuse_live(owner)
            if not resume and has_checkpoints:
                if not overwrite:
                    raise RunDirError(
                        f"run.dir {self.path} holds checkpoints of an earlier run, and "
                        "checkpoint.resume=false would start over in it (and its old, higher-"
                        "step checkpoints would shadow the new ones). Resume it "
                        "(checkpoint.resume=true), choose a new run.dir, or set "
                        "run.overwrite=true to move the old directory aside")
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                aside = self.path.with_name(f"{self.path.name}.old-{stamp}")
                n = 1
                while aside.exists():
                    aside = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
                    n += 1
                os.rename(self.path, aside)
                notes.append(f"run.overwrite=true: moved the old run dir to {aside}")
        notes += self.acquire_lock()
        return notes

    # ---- files ---------------------------------------------------------------------------
    def write_status(self, state: str, **fields: Any) -> None:
        if self.rank == 0:
            self._write_status(state, **fields)

    def _write_status(self, state: str, **fields: Any) -> None:
        status = {"state": state, **fields,
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(self.path / "status.json", strict_json(status, indent=2))

    def write_summary(self, summary: dict) -> None:
        if self.rank == 0:
            _atomic_write(self.path / "summary.json", strict_json(summary, indent=2))

    @property
    def log_path(self) -> pathlib.Path:
        return self.path / "train_log.jsonl"

    def append_log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.log_path, "a") as fh:
                fh.write(strict_json(record) + "\n")

    def append_spike(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.path / "spikes.jsonl", "a") as fh:
                fh.write(strict_json(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines of steps after ``step`` (a resumed run redoes them)."""
        if self.rank != 0 or not self.log_path.exists():
            return
        keep = [ln for ln in self.log_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        _atomic_write(self.log_path, "".join(ln + "\n" for ln in keep))

    def write_config(self, config: dict, keep_previous: bool) -> None:
        """config.yaml of this launch; the previous one is kept as config.yaml.prev when
        ``keep_previous`` (a resume that changed settings)."""
        if self.rank != 0:
            return
        path = self.path / "config.yaml"
        if keep_previous and path.exists():
            os.replace(path, self.path / "config.yaml.prev")
        _atomic_write(path, yaml.safe_dump(config, sort_keys=False))

    def record_error(self, rank: int, err: BaseException, step: int | None,
                     status_fields: dict) -> bool:
        """Write ``error.txt`` and mark status.json failed, if this is the first failing rank
        (creation of error.txt decides). Returns whether it was the first."""
        if not self.path.is_dir():
            return False
        text = format_error(rank, err, step)
        try:
            fd = os.open(self.path / "error.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            self._write_status("failed", **{**status_fields, "step": step,
                                            "failed_rank": rank, "error": one_line(err)})
        except OSError:
            pass          # e.g. the disk is full: error.txt and stderr still carry the message
        return True

    def clear_error(self) -> None:
        """A new launch starts without the previous launch's error file."""
        if self.rank == 0:
            (self.path / "error.txt").unlink(missing_ok=True)


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000]


def format_error(rank: int, err: BaseException, step: int | None) -> str:
    where = f" after step {step}" if step is not None else ""
    tb = traceback.extract_tb(err.__traceback__)[-6:]
    frames = "".join(f"  {f.filename}:{f.lineno} in {f.name}\n" for f in tb)
    return f"rank {rank} failed{where}: {one_line(err)}\ntraceback (innermost last):\n{frames}"
