"""Indexing one webdataset ``.tar`` shard: where each sample's arrays sit inside the file.

The shard is scanned once (tar headers and ``.npy`` headers only), so later reads are a slice of
a memory map. Any structural problem (truncation, a bad header, a missing member, a count that
disagrees with the manifest) raises :class:`ShardCorruptError` naming the file.
"""

from __future__ import annotations

import ast
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sessa_pt.data.manifest import MASK_EXT, META_EXT, TOKENS_EXT, ShardInfo, sample_key


class ShardCorruptError(RuntimeError):
    """A shard file is truncated, malformed, or disagrees with its manifest entry."""


@dataclass
class ShardIndex:
    """Byte offsets of each sample's token and mask arrays (and meta) inside one shard."""

    path: Path
    first_sample_id: int
    token_offsets: np.ndarray  # int64, start of each sample's token data
    mask_offsets: np.ndarray | None  # int64, start of each sample's mask data
    meta_spans: np.ndarray | None  # int64 (num_samples, 2): offset and size of each meta.json


def _npy_data_offset(buf: memoryview, member_offset: int, member_size: int,
                     dtype: np.dtype, count: int, where: str) -> int:
    """Validate an ``.npy`` member's header and return the offset of its data."""
    head = bytes(buf[member_offset:member_offset + 10])
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ShardCorruptError(f"{where}: not an .npy array")
    major = head[6]
    if major == 1:
        header_len = int.from_bytes(head[8:10], "little")
        start = member_offset + 10
    else:
        header_len = int.from_bytes(bytes(buf[member_offset + 8:member_offset + 12]), "little")
        start = member_offset + 12
    try:
        header = ast.literal_eval(bytes(buf[start:start + header_len]).decode("latin1"))
        ok = (np.dtype(header["descr"]) == dtype and tuple(header["shape"]) == (count,)
              and not header["fortran_order"])
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise ShardCorruptError(f"{where}: unreadable .npy header ({err})") from err
    if not ok:
        raise ShardCorruptError(
            f"{where}: array header {header} does not match dtype {dtype} and length {count}"
        )
    data_offset = start + header_len
    if data_offset + dtype.itemsize * count != member_offset + member_size:
        raise ShardCorruptError(f"{where}: array size does not match its tar member size")
    return data_offset


def index_shard(path: Path, info: ShardInfo, seq_len: int, token_dtype: str,
                has_mask: bool) -> ShardIndex:
    """Scan a shard's tar and ``.npy`` headers; raise :class:`ShardCorruptError` on any defect."""
    name = str(path)
    if not path.is_file():
        raise ShardCorruptError(f"shard {name} is missing (listed in the manifest)")
    size = os.path.getsize(path)
    if size != info.bytes:
        raise ShardCorruptError(
            f"shard {name} has {size} bytes but the manifest records {info.bytes}: "
            "the file is truncated or was overwritten; re-run the tokenizer or restore it"
        )
    dtype = np.dtype(token_dtype)
    expected = {TOKENS_EXT}
    if has_mask:
        expected.add(MASK_EXT)
    token_offsets = np.empty(info.num_samples, dtype=np.int64)
    mask_offsets = np.empty(info.num_samples, dtype=np.int64) if has_mask else None
    meta_spans = np.full((info.num_samples, 2), -1, dtype=np.int64)
    seen: dict[int, set[str]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardCorruptError(f"shard {name} is not a readable tar file: {err}") from err
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            _index_members(members, buf, name, size, info, seq_len, dtype, token_offsets,
                           mask_offsets, meta_spans, seen)
        finally:
            buf.release()
    if len(seen) != info.num_samples:
        raise ShardCorruptError(
            f"shard {name} holds {len(seen)} samples but the manifest records {info.num_samples}"
        )
    for local, exts in seen.items():
        if not expected <= exts:
            raise ShardCorruptError(
                f"shard {name}: sample {info.first_sample_id + local} lacks "
                f"{sorted(expected - exts)}"
            )
    has_meta = bool(info.num_samples) and bool((meta_spans[:, 0] >= 0).all())
    return ShardIndex(path=path, first_sample_id=info.first_sample_id,
                      token_offsets=token_offsets, mask_offsets=mask_offsets,
                      meta_spans=meta_spans if has_meta else None)


def _index_members(members: list[tarfile.TarInfo], buf: memoryview, name: str, size: int,
                   info: ShardInfo, seq_len: int, dtype: np.dtype, token_offsets: np.ndarray,
                   mask_offsets: np.ndarray | None, meta_spans: np.ndarray,
                   seen: dict[int, set[str]]) -> None:
    for member in members:
        key, _, ext = member.name.partition(".")
        if not key.startswith("s") or not key[1:].isdigit():
            raise ShardCorruptError(f"shard {name}: unexpected member {member.name!r}")
        local = int(key[1:]) - info.first_sample_id
        if not 0 <= local < info.num_samples or sample_key(int(key[1:])) != key:
            raise ShardCorruptError(
                f"shard {name}: member {member.name!r} is outside the manifest's sample range"
            )
        where = f"shard {name}, member {member.name}"
        if member.offset_data + member.size > size:
            raise ShardCorruptError(f"{where}: data runs past the end of the file (truncated)")
        if ext == TOKENS_EXT:
            token_offsets[local] = _npy_data_offset(
                buf, member.offset_data, member.size, dtype, seq_len + 1, where)
        elif ext == MASK_EXT and mask_offsets is not None:
            mask_offsets[local] = _npy_data_offset(
                buf, member.offset_data, member.size, np.dtype(np.uint8), seq_len, where)
        elif ext == META_EXT:
            meta_spans[local] = (member.offset_data, member.size)
        else:
            raise ShardCorruptError(f"{where}: unexpected member type {ext!r}")
        seen.setdefault(local, set()).add(ext)
