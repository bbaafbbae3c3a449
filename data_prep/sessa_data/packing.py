"""Packing a split's token stream into fixed-length samples, one shard at a time.

The stream is every document's tokens followed by eos. Sample ``i`` is
``stream[i*L : i*L + L + 1]``: consecutive samples overlap by one token, so every stream token
after the first is a label exactly once. A shard holds ``samples_per_shard`` samples; shard
boundaries therefore depend only on the stream, which makes output identical for any number of
workers and across an interruption. The tail that does not fill a sample is dropped.
"""

from __future__ import annotations

import numpy as np


class StreamPacker:
    """Tokens not yet written to a finished shard, and the cut into shard-sized sample blocks."""

    def __init__(self, seq_len: int, samples_per_shard: int,
                 pending: np.ndarray | None = None) -> None:
        if seq_len <= 0 or samples_per_shard <= 0:
            raise ValueError("seq_len and samples_per_shard must be positive")
        self.seq_len = seq_len
        self.samples_per_shard = samples_per_shard
        self._parts: list[np.ndarray] = []
        self._size = 0
        if pending is not None and len(pending):
            self.add(pending)

    @property
    def pending_tokens(self) -> int:
        return self._size

    def add(self, tokens: np.ndarray) -> None:
        self._parts.append(np.asarray(tokens, dtype=np.uint32))
        self._size += len(tokens)

    def pending(self) -> np.ndarray:
        """All unwritten tokens, as one array (also compacts the internal buffer)."""
        if len(self._parts) != 1:
            joined = (np.concatenate(self._parts) if self._parts
                      else np.zeros(0, dtype=np.uint32))
            self._parts = [joined]
        return self._parts[0]

    def _take(self, num_samples: int) -> np.ndarray:
        """Remove ``num_samples`` samples from the front; return them as (n, L+1)."""
        buf = self.pending()
        length = self.seq_len
        starts = np.arange(num_samples, dtype=np.int64) * length
        block = buf[starts[:, None] + np.arange(length + 1)]
        rest = buf[num_samples * length:]
        self._parts = [rest]
        self._size = len(rest)
        return block

    def full_shard(self) -> np.ndarray | None:
        """The next full shard's samples, if enough tokens are pending."""
        if self._size < self.samples_per_shard * self.seq_len + 1:
            return None
        return self._take(self.samples_per_shard)

    def final_shard(self) -> tuple[np.ndarray | None, int]:
        """The last, partial shard and the number of tail tokens dropped."""
        if self._size <= self.seq_len:
            dropped = self._size
            self._parts, self._size = [], 0
            return None, dropped
        n = (self._size - 1) // self.seq_len
        block = self._take(n)
        dropped = self._size - 1  # the first remaining token was the last sample's label
        self._parts, self._size = [], 0
        return block, dropped
