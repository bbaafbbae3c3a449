"""Random access to the samples of one split of shards: ``TokenShardDataset``.

It owns the checks made before training reads a single token (seq_len and tokenizer hash agree
with the config, every shard is whole) and the per-process memory maps used to read samples.
Sample ``i`` of the dataset is the ``i``-th readable sample in manifest order; its ``sample_id``
is the global id written in the shard (they differ only when corrupt shards are skipped).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sessa_pt.data.manifest import Manifest, ManifestError, read_manifest, sha256_file
from sessa_pt.data.shard_index import ShardCorruptError, ShardIndex, index_shard

log = logging.getLogger(__name__)


class TokenShardDataset:
    """Samples of ``seq_len + 1`` tokens (and an optional loss mask) from a shard manifest.

    Args:
        manifest_path: a split's ``manifest.json`` (or its directory).
        expected_seq_len: the training seq_len; a manifest with another one is refused.
        expected_tokenizer_hash: sha256 of the sentencepiece model (or task vocabulary) the
            config uses; ``None`` skips the check.
        skip_corrupt: skip (and log) unreadable shards instead of raising.
        verify_checksums: also compare each shard's sha256 with the manifest (reads every byte).
    """

    def __init__(self, manifest_path: str | os.PathLike[str], expected_seq_len: int | None = None,
                 expected_tokenizer_hash: str | None = None, skip_corrupt: bool = False,
                 verify_checksums: bool = False) -> None:
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
        self.seq_len = m.seq_len
        self.vocab_size = m.vocab_size
        self.has_mask = m.has_mask
        self.pad_id = m.pad_id
        self._dtype = np.dtype(m.token_dtype)
        self.skipped_shards: list[str] = []
        indexes: list[ShardIndex] = []
        for shard in m.shards:
            path = m.shard_path(shard)
            try:
                if verify_checksums and path.is_file() and sha256_file(path) != shard.sha256:
                    raise ShardCorruptError(
                        f"shard {path} does not match the sha256 in the manifest (corrupt)")
                indexes.append(index_shard(path, shard, m.seq_len, m.token_dtype, m.has_mask))
            except ShardCorruptError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping corrupt shard: %s", err)
                self.skipped_shards.append(str(path))
        self._shards = indexes
        counts = np.array([len(ix.token_offsets) for ix in indexes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self._starts[-1])
        self.shard_paths = [str(ix.path) for ix in indexes]
        self._maps: dict[int, np.ndarray] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # memory maps are reopened in each process
        state["_pid"] = -1
        return state

    def _buffer(self, shard: int) -> np.ndarray:
        if self._maps is None or self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        buf = self._maps.get(shard)
        if buf is None:
            with open(self._shards[shard].path, "rb") as handle:
                mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            buf = np.frombuffer(mm, dtype=np.uint8)
            self._maps[shard] = buf
        return buf

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position inside it) of dataset index ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} out of range [0, {self.num_samples})")
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def sample_id(self, index: int) -> int:
        shard, local = self.locate(index)
        return self._shards[shard].first_sample_id + local

    def tokens_numpy(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of a sample, as a read-only view of the shard."""
        shard, local = self.locate(index)
        start = int(self._shards[shard].token_offsets[local])
        nbytes = (self.seq_len + 1) * self._dtype.itemsize
        return self._buffer(shard)[start:start + nbytes].view(self._dtype)

    def mask_numpy(self, index: int) -> np.ndarray | None:
        """The ``seq_len`` loss-mask flags (uint8) of a task sample, or ``None`` for text."""
        if not self.has_mask:
            return None
        shard, local = self.locate(index)
        offsets = self._shards[shard].mask_offsets
        assert offsets is not None
        start = int(offsets[local])
        return self._buffer(shard)[start:start + self.seq_len]

    def meta(self, index: int) -> dict[str, Any] | None:
        """The task metadata stored with a sample (class label, passkey, lags), if any."""
        shard, local = self.locate(index)
        spans = self._shards[shard].meta_spans
        if spans is None:
            return None
        offset, size = (int(v) for v in spans[local])
        return json.loads(self._buffer(shard)[offset:offset + size].tobytes().decode("utf-8"))

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
