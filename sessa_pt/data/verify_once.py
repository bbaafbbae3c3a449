"""Run a check once per shard per rank, shared by the rank's DataLoader workers.

A rank's dataset is read by the rank's own process (evaluation) and by its DataLoader workers
(training), which are forked or spawned from it, again for every new iterator. The verdicts
live in a shared-memory tensor created with the dataset, and checks run under one lock, so
whichever of these processes opens a shard first checks it and the others only read the verdict.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from collections.abc import Callable
from typing import Any

import torch


class VerifyOnce:
    """Per-shard verdicts shared across the processes of one rank (see the module docstring)."""

    def __init__(self, num_shards: int) -> None:
        # torch shares the tensor through fork and through DataLoader's pickling for spawn
        self.verified = torch.zeros(num_shards, dtype=torch.bool).share_memory_()
        self.lock = multiprocessing.get_context().Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        try:  # a lock can only travel to a process being started (DataLoader's spawn)
            multiprocessing.context.assert_spawning(self)
        except RuntimeError:  # a plain copy or pickle: it gets its own verdicts and lock
            state["lock"] = None
            state["verified"] = self.verified.clone()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.lock is None:
            self.verified = self.verified.share_memory_()
            self.lock = multiprocessing.get_context().Lock()

    def mark_verified(self, shard: int) -> None:
        self.verified[shard] = True

    def ensure(self, shard: int, check: Callable[[], None]) -> None:
        """Run ``check`` unless this rank has verified ``shard``; if it raises, the shard stays
        unverified and the exception propagates."""
        if bool(self.verified[shard]):
            return
        # One lock for all shards: a worker that needs a shard being checked waits for the
        # verdict instead of hashing it too. If the checking process dies, DataLoader stops
        # the whole loader, so nobody waits on the lock for ever.
        with self.lock:
            if not bool(self.verified[shard]):
                check()
                self.verified[shard] = True
