"""Writing one webdataset ``.tar`` shard of fixed-length samples and its index, atomically and
reproducibly.

The tar is plain ustar: every member has fixed metadata (integer mtime 0, owner ``sessa``, mode
0444) and exactly one 512-byte header, so the same samples always give the same bytes and no
member carries a PAX header. While writing, the byte offset of every sample's arrays is recorded
in the shard's index file (see :mod:`sessa_pt.data.manifest`), so readers never scan the tar.
Both files are written under temporary names and renamed into place, the index first.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sessa_pt.data.manifest import (
    INDEX_COLUMNS,
    INDEX_MASK,
    INDEX_META,
    INDEX_META_SIZE,
    INDEX_TOKENS,
    MASK_EXT,
    META_EXT,
    TOKENS_EXT,
    ShardInfo,
    index_name,
    sample_key,
    sha256_file,
)

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # the two zero blocks that end an archive
TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this


@dataclass
class Sample:
    """One sample: ``seq_len + 1`` tokens, an optional ``seq_len`` mask, optional metadata."""

    tokens: np.ndarray
    mask: np.ndarray | None = None
    meta: dict[str, Any] | None = None


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def tar_member_bytes(payload_bytes: int) -> int:
    """Bytes one tar member occupies (its ustar header plus data padded to 512)."""
    return TAR_BLOCK + -(-payload_bytes // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar file whose members take ``member_bytes`` (end blocks, record padding)."""
    return -(-(member_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


def lm_sample_tar_bytes(seq_len: int, token_dtype: str) -> int:
    """Tar bytes taken by one text sample (tokens only)."""
    example = np.zeros(seq_len + 1, dtype=token_dtype)
    return tar_member_bytes(len(npy_bytes(example)))


def lm_samples_per_shard(shard_bytes: int, seq_len: int, token_dtype: str) -> int:
    """The most text samples whose shard file stays within ``shard_bytes`` (at least 1)."""
    per_sample = lm_sample_tar_bytes(seq_len, token_dtype)
    count = max(1, (shard_bytes - TAR_END) // per_sample)
    while count > 1 and tar_file_bytes(count * per_sample) > shard_bytes:
        count -= 1
    return count


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # an int: a float mtime makes tarfile add a PAX header to every member
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "sessa"
    return info


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, samples: Sequence[Sample], first_sample_id: int,
                token_dtype: str) -> ShardInfo:
    """Write ``samples`` to ``path`` and its index beside it; describe both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    index_path = path.with_name(index_name(path.name))
    tmp, index_tmp = (p.with_name(p.name + ".tmp") for p in (path, index_path))
    index = np.full((len(samples), INDEX_COLUMNS), -1, dtype=np.int64)
    num_tokens = 0
    # ustar, not the default PAX format: a field that ustar cannot hold is then an error here
    # instead of a silent extra header per member.
    with open(tmp, "wb") as handle, tarfile.open(fileobj=handle, mode="w",
                                                 format=tarfile.USTAR_FORMAT) as tar:
        for local, sample in enumerate(samples):
            key = sample_key(first_sample_id + local)
            if sample.tokens.size and (sample.tokens.min() < 0
                                       or sample.tokens.max() > np.iinfo(token_dtype).max):
                raise ValueError(f"sample {first_sample_id + local} for {path} has token ids "
                                 f"outside [0, {np.iinfo(token_dtype).max}] ({token_dtype})")
            tokens = sample.tokens.astype(token_dtype)
            # (member extension, bytes, index column, bytes of array data at the member's end)
            members = [(TOKENS_EXT, npy_bytes(tokens), INDEX_TOKENS, tokens.nbytes)]
            if sample.mask is not None:
                mask = sample.mask.astype(np.uint8)
                members.append((MASK_EXT, npy_bytes(mask), INDEX_MASK, mask.nbytes))
            if sample.meta is not None:
                meta = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
                members.append((META_EXT, meta, INDEX_META, len(meta)))
            for ext, payload, column, data_bytes in members:
                tar.addfile(_member(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
                member_end = tar.offset - (-len(payload) % TAR_BLOCK)  # less the padding
                index[local, column] = member_end - data_bytes
                if column == INDEX_META:
                    index[local, INDEX_META_SIZE] = data_bytes
            num_tokens += int(sample.tokens.shape[0]) - 1  # positions trained on
    with open(index_tmp, "wb") as handle:
        np.save(handle, index, allow_pickle=False)
    _fsync_replace(index_tmp, index_path)
    _fsync_replace(tmp, path)
    return ShardInfo(path=path.name, num_samples=len(samples), num_tokens=num_tokens,
                     bytes=os.path.getsize(path), sha256=sha256_file(path),
                     first_sample_id=first_sample_id, index=index_path.name,
                     index_sha256=sha256_file(index_path))
