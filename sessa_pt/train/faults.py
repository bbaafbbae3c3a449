"""Fault injection for the fault tests (never active unless the variable is set).

``SESSA_PT_FAULT`` holds one or more comma-separated ``<fault>:<step>[@<rank>]`` entries (the
rank defaults to 0):
- ``kill_in_step:N`` SIGKILLs the rank in the middle of optimizer step N (after its
  forward/backward, before the optimizer update completes the step);
- ``kill_in_save:N`` SIGKILLs it while checkpoint N is being written (after the engine state
  is on disk, before the directory is renamed and marked complete);
- ``raise_in_step:N`` raises a RuntimeError at the start of step N;
- ``hang_in_step:N`` sleeps forever at the start of step N (the others wait in a collective);
- ``nan_loss:N`` makes the rank's loss NaN in step N (a non-finite step on one rank only);
- ``spike_loss:N`` multiplies the rank's loss by 50 in step N.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist


def _active(where: str, step: int) -> bool:
    rank = dist.get_rank() if dist.is_initialized() else 0
    for entry in filter(None, os.environ.get("SESSA_PT_FAULT", "").split(",")):
        spec, _, on_rank = entry.partition("@")
        if spec == f"{where}:{step}" and int(on_rank or 0) == rank:
            return True
    return False


def maybe_kill(where: str, step: int) -> None:
    if _active(where, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail(where: str, step: int) -> None:
    if _active(where, step):
        raise RuntimeError(f"injected fault {where}:{step}")


def maybe_hang(where: str, step: int) -> None:
    if _active(where, step):
        while True:
            time.sleep(1)


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    if _active("nan_loss", step):
        return loss * float("nan")
    if _active("spike_loss", step):
        return loss * 50.0
    return loss
