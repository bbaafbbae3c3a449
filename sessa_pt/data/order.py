"""The global sample order and how a global batch is cut into per-rank micro-batches.

Position ``p`` of the infinite training stream is sample ``perm(seed, epoch)[p % N]`` with
``epoch = p // N``: a pure function of (seed, epoch, position), never of rank or worker.
Step ``k`` consumes positions ``[k*G, (k+1)*G)``; rank ``r`` of ``n`` takes the contiguous slice
``[r*G/n, (r+1)*G/n)`` of it, split in order into ``grad_accum`` micro-batches of ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order of the dataset's samples in one epoch (deterministic across machines)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 0x5E55A])))
    perm = rng.permutation(num_samples).astype(np.int64)
    perm.setflags(write=False)
    return perm


def positions_to_indices(positions: np.ndarray, seed: int, num_samples: int,
                         shuffle: bool = True) -> np.ndarray:
    """Dataset indices of global stream positions (which may span several epochs)."""
    positions = np.asarray(positions, dtype=np.int64)
    if not shuffle:
        return positions % num_samples
    epochs = positions // num_samples
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = epoch_permutation(seed, int(epoch), num_samples)[positions[sel] % num_samples]
    return out


@dataclass(frozen=True)
class BatchLayout:
    """Global batch G = micro_batch_size * grad_accum * dp_size, and this rank's part of it."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __post_init__(self) -> None:
        g, b, r, n = (self.global_batch_size, self.micro_batch_size, self.dp_rank, self.dp_size)
        if b <= 0 or n <= 0 or g <= 0:
            raise ValueError(f"batch sizes and dp_size must be positive (G={g}, b={b}, dp={n})")
        if not 0 <= r < n:
            raise ValueError(f"dp_rank {r} is not in [0, dp_size={n})")
        if g % (b * n):
            raise ValueError(
                f"global_batch_size {g} is not a multiple of micro_batch_size * dp_size = "
                f"{b} * {n}: choose G = b * grad_accum * dp_size"
            )

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def micro_batch_positions(self, micro_step: int) -> np.ndarray:
        """Global stream positions of this rank's ``micro_step``-th micro-batch (from 0)."""
        step, accum = divmod(micro_step, self.grad_accum)
        per_rank = self.global_batch_size // self.dp_size
        start = step * self.global_batch_size + self.dp_rank * per_rank
        start += accum * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)
