"""One shard's files on disk: the cheap checks made when a dataset is opened, the checksum check
made before a shard is first read, and the shard's index (where each sample's arrays sit inside
the tar, written by the shard writer, so nothing scans the tar).

Every problem raises :class:`ShardCorruptError` naming the file and what to do about it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sessa_pt.data.manifest import (
    INDEX_COLUMNS,
    INDEX_MASK,
    INDEX_META,
    INDEX_META_SIZE,
    INDEX_TOKENS,
    ShardInfo,
    sha256_file,
)


class ShardCorruptError(RuntimeError):
    """A shard file is missing, truncated, damaged, or disagrees with its manifest entry."""


@dataclass
class ShardIndex:
    """Byte offsets of each sample's token and mask arrays (and meta) inside one shard."""

    token_offsets: np.ndarray  # int64, start of each sample's token data
    mask_offsets: np.ndarray | None  # int64, start of each sample's mask data
    meta_spans: np.ndarray | None  # int64 (num_samples, 2): offset and size of each meta.json


def check_shard_files(path: Path, index_path: Path, info: ShardInfo, regenerate: str) -> None:
    """What can be checked without reading the files: both exist, the tar has its size."""
    if not path.is_file():
        raise ShardCorruptError(f"shard {path} is missing (listed in the manifest); restore it "
                                f"or regenerate the split: {regenerate}")
    size = path.stat().st_size
    if size != info.bytes:
        raise ShardCorruptError(
            f"shard {path} has {size} bytes but the manifest records {info.bytes}: "
            f"the file is truncated or was overwritten; restore it or regenerate the split: "
            f"{regenerate}"
        )
    if not index_path.is_file():
        raise ShardCorruptError(f"shard index {index_path} is missing (listed in the manifest); "
                                f"restore it or regenerate the split: {regenerate}")


def _mismatch(what: Path, expected: str, actual: str, regenerate: str) -> ShardCorruptError:
    return ShardCorruptError(
        f"{what} does not match its checksum: the manifest records sha256 {expected} but the "
        f"file has sha256 {actual}; it was overwritten or damaged after it was written. Restore "
        f"it, or regenerate the split: {regenerate}"
    )


def verify_shard(path: Path, index_path: Path, info: ShardInfo, regenerate: str) -> None:
    """Compare the tar's and the index's sha256 with the manifest (reads every byte once)."""
    actual = sha256_file(path)
    if actual != info.sha256:
        raise _mismatch(path, info.sha256, actual, regenerate)
    actual = hashlib.sha256(index_path.read_bytes()).hexdigest()
    if actual != info.index_sha256:
        raise _mismatch(index_path, info.index_sha256, actual, regenerate)


def load_index(index_path: Path, info: ShardInfo, shard_bytes: int, seq_len: int,
               token_itemsize: int, has_mask: bool) -> ShardIndex:
    """Read a shard's index and check that every span it names lies inside the shard."""
    where = f"shard index {index_path}"
    try:
        table = np.load(io.BytesIO(index_path.read_bytes()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardCorruptError(f"{where} is not a readable .npy array ({err})") from err
    if table.dtype != np.int64 or table.shape != (info.num_samples, INDEX_COLUMNS):
        raise ShardCorruptError(
            f"{where} holds {table.dtype} {table.shape}, expected int64 "
            f"({info.num_samples}, {INDEX_COLUMNS}) for the manifest's {info.num_samples} samples"
        )

    def spans(column: int, size: np.ndarray | int, name: str) -> np.ndarray:
        start = table[:, column]
        if ((start < 0) | (start + size > shard_bytes)).any():
            raise ShardCorruptError(f"{where}: a {name} span lies outside the shard's "
                                    f"{shard_bytes} bytes")
        return np.ascontiguousarray(start)

    tokens = spans(INDEX_TOKENS, (seq_len + 1) * token_itemsize, "tokens")
    mask = spans(INDEX_MASK, seq_len, "mask") if has_mask else None
    meta = None
    if info.num_samples and (table[:, INDEX_META] >= 0).all():
        spans(INDEX_META, table[:, INDEX_META_SIZE], "meta")
        meta = np.ascontiguousarray(table[:, [INDEX_META, INDEX_META_SIZE]])
    return ShardIndex(token_offsets=tokens, mask_offsets=mask, meta_spans=meta)
