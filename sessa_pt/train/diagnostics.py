"""Making hangs diagnosable: process-group timeouts, the NCCL flight recorder, Python stack
dumps, and timed start-up phases.

- Start-up runs under ``run.startup_timeout_s`` (rendezvous, model build and resume can be
  slow); once training runs every process group gets ``run.step_timeout_s``
  (``torch.distributed.distributed_c10d._set_pg_timeout``, the one call that changes the
  timeout of an existing group, megatron's and DeepSpeed's included).
- Each step arms ``faulthandler.dump_traceback_later(run.step_timeout_s)``: a step that takes
  longer writes every thread's Python stack to ``<run.dir>/stacks_rank<r>.txt`` (before the
  collective's own timeout fires, which can kill the process). ``kill -USR2 <pid>`` writes the
  same file on demand.
- NCCL's flight recorder (the last collectives of every group, dumped on a timeout) is on: we
  set ``TORCH_FR_BUFFER_SIZE=2000``, ``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` and
  ``TORCH_FR_DUMP_TEMP_FILE=<run.dir>/nccl_trace_rank_`` unless they (or their older names
  ``TORCH_NCCL_TRACE_BUFFER_SIZE`` / ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``, which torch 2.13 still
  reads but warns about) are set already.
  Read a dump with ``python -m torch.distributed.flight_recorder.fr_trace``.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import pathlib
import signal
import time


def enable_flight_recorder(run_dir: str | pathlib.Path) -> None:
    """Before init_process_group: NCCL reads these when it creates a communicator."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    if "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in os.environ:
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE",
                              str(pathlib.Path(run_dir).resolve() / "nccl_trace_rank_"))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def set_all_group_timeouts(seconds: float) -> int:
    """Give every process group of this rank ``seconds`` as its timeout; returns how many."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    n = 0
    for group in list(c10d._world.pg_names):
        try:
            c10d._set_pg_timeout(timeout, group)
            n += 1
        except (ValueError, RuntimeError, AssertionError):
            pass      # a group this rank is not part of, or a backend without the setter
    return n


class StackDumps:
    """SIGUSR2 and a step that outlives the step timeout dump all Python stacks to
    ``<run.dir>/stacks_rank<r>.txt``."""

    def __init__(self, run_dir: pathlib.Path, rank: int, step_timeout_s: float) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / f"stacks_rank{rank}.txt"
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open: faulthandler writes to it)
        self.timeout = step_timeout_s
        faulthandler.register(signal.SIGUSR2, file=self.file, all_threads=True, chain=False)

    def arm(self) -> None:
        faulthandler.dump_traceback_later(self.timeout, repeat=False, file=self.file)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        faulthandler.unregister(signal.SIGUSR2)
        self.file.close()


class PhaseTimer:
    """Times the start-up phases; ``summary()`` is one log line."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - t0))

    def summary(self) -> str:
        return "start-up: " + ", ".join(f"{n} {s:.1f}s" for n, s in self.phases)
