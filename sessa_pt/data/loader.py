"""Train and eval loaders over a ``TokenShardDataset``.

The training loader is infinite over epochs, follows :mod:`sessa_pt.data.order`, and keeps one
integer of state, ``cursor``: the number of global samples consumed by completed global batches.
A DataLoader with workers fetches whole micro-batches by their number, and DataLoader returns
them in that order, so workers never change what a rank sees.

The eval loader is one finite pass in manifest order. Global eval batch ``j`` holds positions
``[j*b*n, (j+1)*b*n)`` and rank ``r`` reads its ``b`` of them; positions past the end of the set
are padding (a copy of sample 0 with ``loss_mask`` all zero and ``sample_id`` -1), so every rank
runs the same number of batches (collectives stay matched) and no sample counts twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sessa_pt.data.cursor import DataCursor
from sessa_pt.data.dataset import TokenShardDataset
from sessa_pt.data.order import BatchLayout, positions_to_indices

Batch = dict[str, torch.Tensor]


def collate_arrays(ds: TokenShardDataset, indices: np.ndarray,
                   valid: np.ndarray | None = None,
                   context_weight: float = 0.0) -> dict[str, np.ndarray]:
    """Stack samples into numpy ``tokens`` (seq_len + 1 per row), ``loss_mask`` and
    ``sample_ids``; :func:`to_batch` makes the model's tensors of them.

    ``context_weight`` > 0 (task shards, training only): the non-padding positions outside the
    answer mask become targets too, with this weight (an answer token weighs 1).
    """
    tokens = ds.tokens_batch(indices).astype(np.int64)
    if ds.has_mask:
        mask = np.stack([ds.mask_numpy(int(i)) for i in indices]).astype(np.float32)
        if context_weight > 0:
            context = (tokens[:, 1:] != ds.pad_id) & (mask == 0)
            mask += np.float32(context_weight) * context
    else:
        mask = np.ones((len(indices), ds.seq_len), dtype=np.float32)
    ids = np.array([ds.sample_id(int(i)) for i in indices], dtype=np.int64)
    if valid is not None:
        mask[~valid] = 0.0
        ids[~valid] = -1
    return {"tokens": tokens, "loss_mask": mask, "sample_ids": ids}


def to_batch(arrays: dict[str, np.ndarray], pin_memory: bool = False) -> Batch:
    """``input_ids``, ``labels`` (views of one token tensor), ``loss_mask``, ``sample_ids``."""
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if pin_memory:
        t = {k: v.pin_memory() for k, v in t.items()}
    tokens = t.pop("tokens")
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], **t}


def collate_indices(ds: TokenShardDataset, indices: np.ndarray,
                    valid: np.ndarray | None = None, context_weight: float = 0.0) -> Batch:
    """:func:`collate_arrays` as the model's tensors."""
    return to_batch(collate_arrays(ds, indices, valid, context_weight))


def _as_is(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return arrays


class _TrainMicroBatches(Dataset):
    """Map-style view: item ``m`` is this rank's ``m``-th micro-batch, as numpy arrays.

    Workers hand numpy arrays back, pickled by value through the pipe. A torch tensor would
    cross as a shared-memory file descriptor, which the training process receives over a new
    socket connection per tensor, on the training loop's critical path: receiving a ready
    batch took 2.8 ms with tensors and 2.0 ms with arrays (64 x 545 tokens, CPU machine;
    BENCHMARKS.md, Data)."""

    def __init__(self, ds: TokenShardDataset, layout: BatchLayout, seed: int,
                 shuffle: bool, context_weight: float) -> None:
        self.ds, self.layout, self.seed, self.shuffle = ds, layout, seed, shuffle
        self.context_weight = context_weight

    def __getitem__(self, micro_step: int) -> dict[str, np.ndarray]:
        positions = self.layout.micro_batch_positions(micro_step)
        indices = positions_to_indices(positions, self.seed, self.ds.num_samples, self.shuffle)
        return collate_arrays(self.ds, indices, context_weight=self.context_weight)


class _CountFrom(Sampler[int]):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TrainLoader:
    """Iterate micro-batches for one rank; ``cursor`` is the checkpointable state."""

    def __init__(self, ds: TokenShardDataset, layout: BatchLayout, seed: int, start_cursor: int,
                 num_workers: int, prefetch_factor: int, shuffle: bool,
                 pin_memory: bool, context_weight: float = 0.0,
                 worker_init_fn: Callable[[int], None] | None = None) -> None:
        self.ds, self.layout, self.seed = ds, layout, seed
        self.start_cursor = start_cursor
        self.cursor = start_cursor
        self._micro = _TrainMicroBatches(ds, layout, seed, shuffle, context_weight)
        self.num_workers, self.prefetch_factor, self.pin_memory = (
            num_workers, prefetch_factor, pin_memory)
        self.worker_init_fn = worker_init_fn

    @property
    def grad_accum(self) -> int:
        return self.layout.grad_accum

    def data_cursor(self) -> DataCursor:
        """The cursor with the seed and global batch size that give it meaning."""
        return DataCursor(self.cursor, self.seed, self.layout.global_batch_size)

    def __iter__(self) -> Iterator[Batch]:
        first_micro = (self.cursor // self.layout.global_batch_size) * self.layout.grad_accum
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False,
                      "worker_init_fn": self.worker_init_fn}
        # collate_fn=_as_is: the default would turn the arrays into tensors inside the worker
        loader = DataLoader(self._micro, batch_size=None, sampler=_CountFrom(first_micro),
                            num_workers=self.num_workers, collate_fn=_as_is, **kwargs)
        for count, arrays in enumerate(loader, start=1):
            if count % self.layout.grad_accum == 0:
                self.cursor += self.layout.global_batch_size
            yield to_batch(arrays, self.pin_memory)


def build_train_loader(ds: TokenShardDataset, seed: int, global_batch_size: int,
                       micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                       start_cursor: int | DataCursor = 0, num_workers: int = 0, prefetch_factor: int = 4,
                       shuffle: bool = True, pin_memory: bool = False,
                       context_weight: float = 0.0,
                       worker_init_fn: Callable[[int], None] | None = None) -> TrainLoader:
    """The infinite, resumable training loader of one data-parallel rank.

    ``start_cursor`` is a saved ``loader.cursor``: a multiple of ``global_batch_size``. Resuming
    with another ``dp_size`` (same G) gives every sample the same step it would have had.
    A :class:`DataCursor` is also accepted; its seed and G must match. ``context_weight``: see
    :func:`collate_indices`. ``worker_init_fn`` runs in each DataLoader worker (the trainer
    makes its workers ignore the stop signals, which are for the training process).
    """
    if ds.num_samples == 0:
        raise ValueError(f"{ds!r} has no samples to train on")
    if context_weight < 0:
        raise ValueError(f"context_weight must be >= 0, got {context_weight}")
    if context_weight > 0 and (not ds.has_mask or ds.pad_id is None):
        raise ValueError(f"context_weight={context_weight} needs task shards (a loss mask and a "
                         f"pad id); {ds!r} has none: every token of text shards is already a "
                         "target, so leave data.context_loss_weight at 0")
    if isinstance(start_cursor, DataCursor):
        start_cursor.check_compatible(seed, global_batch_size)
        start_cursor = start_cursor.samples
    layout = BatchLayout(global_batch_size, micro_batch_size, dp_rank, dp_size)
    if start_cursor < 0 or start_cursor % global_batch_size:
        raise ValueError(
            f"start_cursor {start_cursor} is not a non-negative multiple of the global batch "
            f"size {global_batch_size}: resume with the same global batch size the cursor was "
            "saved with"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return TrainLoader(ds, layout, seed, start_cursor, num_workers, prefetch_factor, shuffle,
                       pin_memory, context_weight, worker_init_fn=worker_init_fn)


class EvalLoader:
    """One finite pass over a split; see the module docstring for the padding rule."""

    def __init__(self, ds: TokenShardDataset, micro_batch_size: int, dp_rank: int,
                 dp_size: int, max_samples: int | None) -> None:
        self.ds, self.b, self.rank, self.n = ds, micro_batch_size, dp_rank, dp_size
        total = ds.num_samples if max_samples is None else min(max_samples, ds.num_samples)
        self.total = total
        self.num_batches = -(-total // (micro_batch_size * dp_size))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        per_global = self.b * self.n
        for j in range(self.num_batches):
            start = j * per_global + self.rank * self.b
            positions = np.arange(start, start + self.b, dtype=np.int64)
            valid = positions < self.total
            yield collate_indices(self.ds, np.where(valid, positions, 0), valid)


def build_eval_loader(ds: TokenShardDataset, micro_batch_size: int, dp_rank: int = 0,
                      dp_size: int = 1, max_samples: int | None = None) -> EvalLoader:
    """A deterministic, finite pass over ``ds`` split across ranks (no sample twice)."""
    BatchLayout(micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)  # validates
    if ds.num_samples == 0:
        raise ValueError(f"{ds!r} has no samples to evaluate")
    return EvalLoader(ds, micro_batch_size, dp_rank, dp_size, max_samples)
