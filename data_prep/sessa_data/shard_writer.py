"""Writing one webdataset ``.tar`` shard of fixed-length samples, atomically and reproducibly.

Members carry fixed metadata (mtime 0, fixed owner and mode), so the same samples always give
the same bytes. The tar is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from sessa_pt.data.manifest import (
    MASK_EXT,
    META_EXT,
    TOKENS_EXT,
    ShardInfo,
    sample_key,
    sha256_file,
)

TAR_BLOCK = 512


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
    """Bytes one tar member occupies (header plus data padded to 512)."""
    return TAR_BLOCK + -(-payload_bytes // TAR_BLOCK) * TAR_BLOCK


def lm_sample_tar_bytes(seq_len: int, token_dtype: str) -> int:
    """Tar bytes taken by one text sample (tokens only), used to size shards."""
    example = np.zeros(seq_len + 1, dtype=token_dtype)
    return tar_member_bytes(len(npy_bytes(example)))


def write_shard(path: Path, samples: Sequence[Sample], first_sample_id: int,
                token_dtype: str) -> ShardInfo:
    """Write ``samples`` to ``path`` (temp name, then ``os.replace``) and describe the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    num_tokens = 0
    with open(tmp, "wb") as handle:
        with wds.TarWriter(handle, mtime=0.0, user="sessa", group="sessa", mode=0o444,
                           encoder=False) as writer:
            for offset, sample in enumerate(samples):
                record: dict[str, Any] = {"__key__": sample_key(first_sample_id + offset),
                                          TOKENS_EXT: npy_bytes(sample.tokens.astype(token_dtype))}
                if sample.mask is not None:
                    record[MASK_EXT] = npy_bytes(sample.mask.astype(np.uint8))
                if sample.meta is not None:
                    record[META_EXT] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
                writer.write(record)
                num_tokens += int(sample.tokens.shape[0]) - 1  # positions trained on
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return ShardInfo(path=path.name, num_samples=len(samples), num_tokens=num_tokens,
                     bytes=os.path.getsize(path), sha256=sha256_file(path),
                     first_sample_id=first_sample_id)
