"""Fault injection for the crash-recovery tests (never active unless the variable is set).

``SESSA_PT_FAULT=kill_in_step:N`` SIGKILLs global rank 0 in the middle of optimizer step N
(after its forward/backward, before the optimizer update completes the step);
``SESSA_PT_FAULT=kill_in_save:N`` SIGKILLs it while checkpoint N is being written (after the
engine state is on disk, before the directory is renamed and marked complete).
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_kill(where: str, step: int) -> None:
    spec = os.environ.get("SESSA_PT_FAULT", "")
    if spec and spec == f"{where}:{step}" and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
