"""The experiment runner: runs many training and evaluation jobs over a few GPU slots.

A *slot* is an environment overlay (``{"CUDA_VISIBLE_DEVICES": "0"}``); ``gpu_slots("0", 8)``
gives eight slots on GPU 0, so eight small models train side by side on one H200. A job is one
command with its own log file and, for training, its run directory's ``STOP`` file:

- past ``max_minutes`` the runner writes the STOP file (the trainer saves at the next step and
  exits cleanly: the run counts as *stopped*, its checkpoint is still evaluated);
- past ``max_minutes + kill_after_s`` it sends SIGTERM, and SIGKILL 30 s later (*killed*).

Every job's exit code and wall time come back as a :class:`JobResult`; every command is recorded
(with its slot overlay) so that results can print exactly what ran. ``dry_run`` records and
prints the commands and runs nothing. The reproductions (``sessa_pt.experiments.*``) build
their jobs and hand them here; nothing in this module knows about a particular experiment.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
from typing import IO, Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
KILL_GRACE_S = 30.0
# what a torch process prints when the GPU cannot allocate: torch.OutOfMemoryError's message,
# and cuBLAS's and cuDNN's status when a handle or workspace allocation fails (cuBLAS creates a
# handle lazily, e.g. at the first backward, so a full GPU can surface as this instead)
OOM_MARKERS = ("CUDA out of memory", "torch.OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_ALLOC_FAILED")
MAX_OOM_RETRIES = 2


@dataclasses.dataclass
class Job:
    """One command. ``log``: its output file when run in slots (streamed otherwise);
    ``stop_file``: the trainer's STOP file (written when the job overruns ``max_minutes``)."""
    cmd: list[str]
    log: pathlib.Path | None = None
    stop_file: pathlib.Path | None = None
    name: str = ""


@dataclasses.dataclass
class JobResult:
    code: int
    seconds: float
    stopped: bool = False        # the STOP file was written (time budget reached)
    killed: bool = False         # the job ignored the STOP file and was terminated
    oom_retries: int = 0         # times it ran out of GPU memory beside others and was requeued


@dataclasses.dataclass
class _Running:
    proc: subprocess.Popen
    slot: int
    t0: float
    out: IO[str] | None
    stopped: bool = False
    term_at: float | None = None


def gpu_slots(gpus: str, per_gpu: int) -> list[dict[str, str]] | None:
    """``gpu_slots("0,1", 2)`` -> four slots, round robin over the GPUs; ``""`` -> None (one
    job at a time, output streamed)."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        return None
    if per_gpu < 1:
        raise SystemExit("--runs-per-gpu must be >= 1")
    return [{"CUDA_VISIBLE_DEVICES": g} for _ in range(per_gpu) for g in ids]


class Runner:
    """Runs commands one at a time (:meth:`run`, output streamed) or many at once over
    ``slots`` (:meth:`run_all`, a log file per job), from the repository root."""

    def __init__(self, dry_run: bool = False, slots: list[dict[str, str]] | None = None,
                 cwd: pathlib.Path = ROOT, kill_after_s: float = 60.0,
                 poll_s: float = 1.0) -> None:
        self.dry_run, self.cwd = dry_run, cwd
        self.slots = slots or [{}]
        self.kill_after_s, self.poll_s = kill_after_s, poll_s
        self.commands: list[str] = []

    @property
    def parallel(self) -> bool:
        return len(self.slots) > 1

    @staticmethod
    def _format(cmd: list[str], overlay: dict[str, str]) -> str:
        return " ".join([*(f"{k}={v}" for k, v in overlay.items()),
                         *(shlex.quote(c) for c in cmd)])

    def _record(self, cmd: list[str], overlay: dict[str, str]) -> str:
        text = self._format(cmd, overlay)
        self.commands.append(text)
        return text

    def note(self, text: str) -> None:
        """Record a comment line among the commands (e.g. why a step was skipped)."""
        self.commands.append(f"# {text}")

    def run(self, cmd: list[str], env: dict[str, str] | None = None) -> int:
        """Run one command with its output streamed; returns its exit code."""
        print(f"\n$ {self._record(cmd, {})}", flush=True)
        if self.dry_run:
            return 0
        return subprocess.run(cmd, cwd=self.cwd, env={**os.environ, **(env or {})},
                              check=False).returncode

    def run_all(self, jobs: list[Job], env: dict[str, str] | None = None,
                max_minutes: float = 0.0) -> list[JobResult]:
        """Run ``jobs`` over the slots, starting the next whenever a slot frees up, in order.
        Returns one :class:`JobResult` per job, in the order given."""
        results: list[JobResult | None] = [None] * len(jobs)
        pending = list(enumerate(jobs))
        running: dict[int, _Running] = {}
        free = list(range(len(self.slots)))
        waiting: list[tuple[int, Job]] = []  # out-of-memory jobs, until another job ends
        retries = [0] * len(jobs)
        while pending or running:
            while pending and free:
                i, job = pending.pop(0)
                slot = free.pop(0)
                overlay = self.slots[slot] if self.parallel else {}
                # one recorded command per job (callers index them): a retry is not recorded
                text = self._record(job.cmd, overlay) if not retries[i] else \
                    f"{self._format(job.cmd, overlay)}   # again, after running out of memory"
                print(f"\n$ {text}" + (f"\n  (log: {job.log})" if self.parallel and job.log
                                       else ""), flush=True)
                if self.dry_run:
                    results[i] = JobResult(0, 0.0)
                    free.append(slot)
                    continue
                out = None
                if self.parallel and job.log:
                    job.log.parent.mkdir(parents=True, exist_ok=True)
                    # a retried job appends: its log keeps the out-of-memory attempt
                    out = open(job.log, "a" if retries[i] else "w")  # noqa: SIM115 (closed at its end)
                proc = subprocess.Popen(job.cmd, cwd=self.cwd, stdout=out,
                                        stderr=subprocess.STDOUT if out else None,
                                        env={**os.environ, **(env or {}), **overlay})
                running[i] = _Running(proc, slot, time.time(), out)
            if not running:
                continue
            time.sleep(self.poll_s)
            for i, r in list(running.items()):
                if r.proc.poll() is None:
                    self._enforce_budget(jobs[i], r, max_minutes)
                    continue
                if r.out:
                    r.out.close()
                secs = time.time() - r.t0
                del running[i]
                if self._requeue_after_oom(jobs[i], r, retries[i], len(running)):
                    retries[i] += 1     # and its slot is not freed: one slot fewer
                    waiting.append((i, jobs[i]))
                    continue
                results[i] = JobResult(r.proc.returncode, secs, r.stopped,
                                       r.term_at is not None, retries[i])
                free.append(r.slot)
                pending[:0], waiting = waiting, []     # memory has freed: retry those first
                self._report_end(jobs[i], results[i])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _requeue_after_oom(self, job: Job, r: _Running, retries: int, others: int) -> bool:
        """A job that ran its GPU out of memory while ``others`` jobs shared the slots is
        started again once one of them ends, with one slot fewer from then on: packing runs
        side by side must not lose a run to a bad guess of how many fit. A job that runs out
        of memory with nobody beside it fails as it is, so the last running job's slot is
        never retired and one always remains."""
        if (not r.proc.returncode or r.stopped or not others or retries >= MAX_OOM_RETRIES
                or not job.log or not job.log.is_file()):
            return False
        text = job.log.read_text(errors="replace")
        if not any(m in text for m in OOM_MARKERS):
            return False
        print(f"[runner] {job.name or job.log.stem}: out of GPU memory beside {others} other "
              "job(s); it runs again when one of them ends, with one slot fewer from then on",
              flush=True)
        return True

    def _enforce_budget(self, job: Job, r: _Running, max_minutes: float) -> None:
        if not max_minutes:
            return
        age = time.time() - r.t0
        if not r.stopped and age > 60 * max_minutes:
            r.stopped = True
            if job.stop_file:
                job.stop_file.parent.mkdir(parents=True, exist_ok=True)
                job.stop_file.touch()   # the trainer saves at the next step and exits
                print(f"[runner] {max_minutes} min budget reached: wrote {job.stop_file}",
                      flush=True)
        if r.stopped and r.term_at is None and age > 60 * max_minutes + self.kill_after_s:
            print(f"[runner] {job.name or job.cmd[0]}: still running "
                  f"{self.kill_after_s:.0f} s past its budget; terminating", flush=True)
            r.proc.send_signal(signal.SIGTERM)
            r.term_at = time.time()
        elif r.term_at is not None and time.time() - r.term_at > KILL_GRACE_S:
            r.proc.kill()

    def _report_end(self, job: Job, res: JobResult) -> None:
        if not self.parallel:
            return
        name = job.name or (job.log.stem if job.log else " ".join(job.cmd)[:120])
        print(f"[runner] {name}: exit {res.code} after {res.seconds / 60:.1f} min"
              + (" (stopped at its time budget)" if res.stopped else ""), flush=True)
        if res.code and job.log and job.log.is_file():
            print("".join(job.log.read_text().splitlines(True)[-30:]), flush=True)


def tracking_uri(out: pathlib.Path) -> str:
    """The mlflow store that every run of one reproduction logs to."""
    from sessa_pt.train.tracking import default_uri

    return default_uri(str(out))


def ensure_experiment(uri: str, name: str) -> None:
    """Create the mlflow experiment once, before concurrent runs race to create it."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)


def read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def git_commit(cwd: pathlib.Path = ROOT) -> str:
    """``SESSA_GIT_COMMIT`` when set, else the checkout's commit, with ``+dirty`` when tracked
    files differ from it; ``unknown`` outside git. The variable wins because the GPU machine
    gets a copy of the working tree whose ``.git``, when there is one, can be an older
    snapshot's: asked there, git names a stale commit and calls the tree dirty."""
    if explicit := os.environ.get("SESSA_GIT_COMMIT"):
        return explicit
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty.strip() else "")


def environment() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{dev}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
