"""Stopping cleanly: stop requests, DataLoader workers that ignore them, and a watch on the
launcher.

What reaches a worker (torch/distributed/elastic): torchrun starts every worker in a session of
its own and, on SIGTERM/SIGINT (also SIGHUP/SIGQUIT), forwards the signal with ``os.killpg`` to
each worker's process group -- DataLoader worker processes included -- then waits
``--shutdown-timeout`` (30 s) before SIGKILL. Any other signal, SIGUSR1 among them, kills
torchrun itself (default action) and leaves the workers running without a launcher; a
``kill -9`` of torchrun does the same. So a training process:
- handles SIGTERM, SIGINT and SIGUSR1 by asking for a checkpoint at the next step boundary;
- agrees with the other ranks on the stop (all-reduce of the flag at step boundaries);
- watches its parent, and treats the launcher's death as a stop request (then exits anyway
  after ``run.orphan_exit_s``);
- starts DataLoader workers with those signals blocked. A worker's own SIGTERM handler
  (torch's C handler, installed when the worker starts) re-raises SIGTERM unless it came from
  its parent, so the worker would die of torchrun's killpg; a signal that is blocked when the
  worker forks stays blocked in it (the mask is inherited) and is never delivered.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import threading
import time

import torch.distributed as dist

from sessa_pt.parallel.topology import any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """A signal, the file ``<run.dir>/STOP`` or the launcher's death asks for a checkpoint and
    a clean exit at the next step boundary."""

    def __init__(self, stop_file: pathlib.Path) -> None:
        self.stop_file = stop_file
        self.reason: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.reason = self.reason or f"got {signal.Signals(signum).name}"

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def requested(self) -> bool:
        """Collective: true on every rank if any rank saw a request or rank 0 sees the file."""
        flag = self.reason is not None or (dist.get_rank() == 0 and self.stop_file.exists())
        return any_rank(flag)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the stop signals are for the training process only."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread while DataLoader workers fork (they inherit the
    mask); signals that arrive meanwhile are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ParentWatch(threading.Thread):
    """Polls the parent pid. When the launcher dies the process is re-parented: the watch asks
    for a stop (checkpoint at the next step boundary) and, if the process still runs
    ``exit_after_s`` later (a collective that never completes), ends it.

    A thread rather than prctl(PR_SET_PDEATHSIG): the death signal fires when the parent
    *thread* that forked us exits, which need not be the launcher's death, and a signal alone
    cannot give the grace period a checkpoint needs."""

    def __init__(self, stop: StopRequest, exit_after_s: float, poll_s: float = 1.0) -> None:
        super().__init__(name="sessa-parent-watch", daemon=True)
        self.stop, self.exit_after_s, self.poll_s = stop, exit_after_s, poll_s
        self.parent = os.getppid()

    def run(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.poll_s)
        print(f"[sessa_pt] rank {os.environ.get('RANK', '0')}: the launcher (pid "
              f"{self.parent}) is gone; stopping at the next step boundary", flush=True)
        self.stop.request(f"launcher pid {self.parent} died")
        time.sleep(self.exit_after_s)
        print(f"[sessa_pt] rank {os.environ.get('RANK', '0')}: still running "
              f"{self.exit_after_s:.0f} s after the launcher died; exiting", flush=True)
        os._exit(1)
