"""Random access to the samples of one split of shards: ``TokenShardDataset``.

It owns the checks made before training reads a single token (seq_len and tokenizer hash agree
with the config, every shard and index file is there with the recorded size), the checks made
when a shard is first read (its and its index's sha256, once per shard per rank) and on every
sample read (token ids inside the vocabulary), and the per-process memory maps used to read
samples. Sample ``i`` of the dataset is the ``i``-th readable sample in manifest order; its
``sample_id`` is the global id written in the shard (they differ only when corrupt shards are
skipped).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sessa_pt.data.manifest import Manifest, ManifestError, ShardInfo, read_manifest
from sessa_pt.data.shard_index import (
    ShardCorruptError,
    ShardIndex,
    check_shard_files,
    load_index,
    verify_shard,
)
from sessa_pt.data.verify_once import VerifyOnce

log = logging.getLogger(__name__)


class TokenIdError(ValueError):
    """A shard holds a token id outside the vocabulary of the tokenizer or the model."""


@dataclass
class _Shard:
    info: ShardInfo
    path: Path
    index_path: Path


@dataclass
class _OpenShard:
    buffer: np.ndarray  # the whole tar, memory-mapped
    index: ShardIndex


class TokenShardDataset:
    """Samples of ``seq_len + 1`` tokens (and an optional loss mask) from a shard manifest.

    Args:
        manifest_path: a split's ``manifest.json`` (or its directory).
        expected_seq_len: the training seq_len; a manifest with another one is refused.
        expected_tokenizer_hash: sha256 of the sentencepiece model (or task vocabulary) the
            config uses; ``None`` skips the check.
        skip_corrupt: skip (and log) shards found damaged when the dataset is opened (missing
            files, wrong sizes, or with ``verify_checksums`` a wrong sha256) instead of raising.
            A shard found damaged when it is first read is always an error: skipping it then
            would change which sample every later position reads.
        verify_checksums: check every shard's sha256 now instead of when it is first read.
        model_vocab_size: the vocabulary of the model the samples feed. A token id at or beyond
            it, or beyond the manifest's vocabulary, is a :class:`TokenIdError` naming the shard
            and the sample.
    """

    def __init__(self, manifest_path: str | os.PathLike[str], expected_seq_len: int | None = None,
                 expected_tokenizer_hash: str | None = None, skip_corrupt: bool = False,
                 verify_checksums: bool = False, model_vocab_size: int | None = None) -> None:
        self.manifest: Manifest = read_manifest(manifest_path)
        m = self.manifest
        if expected_seq_len is not None and m.seq_len != expected_seq_len:
            raise ManifestError(
                f"{m.path}: shards were packed with seq_len={m.seq_len} but the config expects "
                f"seq_len={expected_seq_len}; re-tokenize with `sessa-data tokenize --seq-len "
                f"{expected_seq_len}` or set the model's seq_len to {m.seq_len}"
            )
        if expected_tokenizer_hash is not None and m.tokenizer_sha256 != expected_tokenizer_hash:
            raise ManifestError(
                f"{m.path}: shards were made with tokenizer sha256 {m.tokenizer_sha256[:16]}... "
                f"but the config's tokenizer has sha256 {expected_tokenizer_hash[:16]}...; "
                "re-tokenize the corpus with the configured tokenizer, or point the config at "
                "the tokenizer that made these shards (its hash is in the manifest)"
            )
        if model_vocab_size is not None and model_vocab_size <= 0:
            raise ValueError(f"model_vocab_size must be positive, got {model_vocab_size}")
        self.seq_len = m.seq_len
        self.vocab_size = m.vocab_size
        self.has_mask = m.has_mask
        self.pad_id = m.pad_id
        self.model_vocab_size = model_vocab_size
        # ids must index the model's embedding and mean something to the tokenizer
        self.token_id_limit = min(m.vocab_size, model_vocab_size or m.vocab_size)
        self._dtype = np.dtype(m.token_dtype)
        self.regenerate_command = m.regenerate_command()
        self.skipped_shards: list[str] = []
        shards: list[_Shard] = []
        for info in m.shards:
            shard = _Shard(info, m.shard_path(info), m.directory / info.index)
            try:
                check_shard_files(shard.path, shard.index_path, info, self.regenerate_command)
                if verify_checksums:
                    verify_shard(shard.path, shard.index_path, info, self.regenerate_command)
            except ShardCorruptError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping corrupt shard: %s", err)
                self.skipped_shards.append(str(shard.path))
                continue
            shards.append(shard)
        self._shards = shards
        self._verified = VerifyOnce(len(shards))
        if verify_checksums:
            for number in range(len(shards)):
                self._verified.mark_verified(number)
        counts = np.array([s.info.num_samples for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self._starts[-1])
        self.shard_paths = [str(s.path) for s in shards]
        self._open: dict[int, _OpenShard] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = None  # memory maps are reopened in each process
        state["_pid"] = -1
        return state

    def _opened(self, number: int) -> _OpenShard:
        """Shard ``number`` of this process, verified (once per rank) and mapped on first use."""
        if self._open is None or self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        opened = self._open.get(number)
        if opened is None:
            shard = self._shards[number]
            self._verified.ensure(number, lambda: verify_shard(
                shard.path, shard.index_path, shard.info, self.regenerate_command))
            index = load_index(shard.index_path, shard.info, shard.info.bytes, self.seq_len,
                               self._dtype.itemsize, self.has_mask)
            with open(shard.path, "rb") as handle:
                mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            opened = _OpenShard(np.frombuffer(mm, dtype=np.uint8), index)
            self._open[number] = opened
        return opened

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position inside it) of dataset index ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range [0, {self.num_samples})")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def sample_id(self, index: int) -> int:
        shard, local = self.locate(index)
        return self._shards[shard].info.first_sample_id + local

    def _token_view(self, index: int) -> np.ndarray:
        shard, local = self.locate(index)
        opened = self._opened(shard)
        start = int(opened.index.token_offsets[local])
        nbytes = (self.seq_len + 1) * self._dtype.itemsize
        return opened.buffer[start:start + nbytes].view(self._dtype)

    def tokens_numpy(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of a sample, as a read-only view of the shard."""
        tokens = self._token_view(index)
        self._check_token_ids(tokens[None], [index])
        return tokens

    def tokens_batch(self, indices: np.ndarray) -> np.ndarray:
        """The token ids of several samples, stacked to ``(len(indices), seq_len + 1)`` (one id
        check for the whole batch, which costs less than one per sample)."""
        tokens = np.stack([self._token_view(int(i)) for i in indices])
        self._check_token_ids(tokens, indices)
        return tokens

    def _check_token_ids(self, tokens: np.ndarray, indices: Any) -> None:
        """Raise :class:`TokenIdError` if a row of ``tokens`` (samples ``indices``) holds an id
        outside the vocabulary. Ids are unsigned, so only the top can be off (a negative id
        given to a writer is refused there)."""
        limit = self.token_id_limit
        if not tokens.size or tokens.max() < limit:
            return
        row = int(np.argmax((tokens >= limit).any(axis=1)))
        position = int(np.argmax(tokens[row] >= limit))
        shard, local = self.locate(int(indices[row]))
        info = self._shards[shard].info
        if limit < self.vocab_size:
            where = f"the model's vocabulary (model.vocab_size={self.model_vocab_size})"
            advice = (f"set model.vocab_size >= {self.vocab_size} (the tokenizer's), or "
                      f"regenerate the shards with a tokenizer of at most "
                      f"{self.model_vocab_size} tokens")
        else:
            where = f"the tokenizer's vocabulary of {self.vocab_size} ids (manifest vocab_size)"
            advice = ("the shard was written with another tokenizer or generator, or damaged; "
                      f"regenerate the split: {self.regenerate_command}")
        raise TokenIdError(
            f"shard {self._shards[shard].path}: sample {info.first_sample_id + local} (sample "
            f"{local} of the shard) has token id {int(tokens[row, position])} at position "
            f"{position}, outside {where}, which allows ids 0..{limit - 1}; {advice}"
        )

    def mask_numpy(self, index: int) -> np.ndarray | None:
        """The ``seq_len`` loss-mask flags (uint8) of a task sample, or ``None`` for text."""
        if not self.has_mask:
            return None
        shard, local = self.locate(index)
        opened = self._opened(shard)
        assert opened.index.mask_offsets is not None
        start = int(opened.index.mask_offsets[local])
        return opened.buffer[start:start + self.seq_len]

    def meta(self, index: int) -> dict[str, Any] | None:
        """The task metadata stored with a sample (class label, passkey, lags), if any."""
        shard, local = self.locate(index)
        opened = self._opened(shard)
        if opened.index.meta_spans is None:
            return None
        offset, size = (int(v) for v in opened.index.meta_spans[local])
        return json.loads(opened.buffer[offset:offset + size].tobytes().decode("utf-8"))

    def get(self, index: int) -> dict[str, Any]:
        """One sample: ``tokens`` LongTensor[L+1], ``mask`` FloatTensor[L] or None, ``sample_id``."""
        tokens = torch.from_numpy(self.tokens_numpy(index).astype(np.int64))
        mask_np = self.mask_numpy(index)
        mask = None if mask_np is None else torch.from_numpy(mask_np.astype(np.float32))
        return {"tokens": tokens, "mask": mask, "sample_id": self.sample_id(index)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def __repr__(self) -> str:
        return (f"TokenShardDataset({Path(self.manifest.path)}, samples={self.num_samples}, "
                f"seq_len={self.seq_len}, vocab={self.vocab_size}, mask={self.has_mask})")
