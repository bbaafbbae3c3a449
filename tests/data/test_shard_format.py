"""The shard format: plain ustar members (no PAX headers), an index written with each shard that
agrees with the tar, shard sizes within --shard-bytes, readable by webdataset, and a clear error
for shards of an older format version."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sessa_data.cli import main
from sessa_data.shard_writer import (
    TAR_BLOCK,
    lm_sample_tar_bytes,
    lm_samples_per_shard,
    npy_bytes,
    tar_file_bytes,
)
from sessa_pt.data import ManifestError, TokenShardDataset, read_manifest
from sessa_pt.data.manifest import FORMAT_VERSION

SEQ_LEN, SHARD_BYTES = 64, 40_000  # as in conftest


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_members_have_one_ustar_header_and_no_pax(lm_shards: Path) -> None:
    manifest = read_manifest(lm_shards / "train")
    per_sample = lm_sample_tar_bytes(SEQ_LEN, "uint16")
    assert per_sample == 2 * TAR_BLOCK  # header + 258 bytes of .npy padded to one block
    for info in manifest.shards:
        members = _members(lm_shards / "train" / info.path)
        assert len(members) == info.num_samples
        for member in members:
            assert member.pax_headers == {} and member.offset_data - member.offset == TAR_BLOCK
            assert member.mtime == 0 and member.uname == "sessa" and member.mode == 0o444
        assert info.bytes == tar_file_bytes(info.num_samples * per_sample)
        assert info.bytes <= SHARD_BYTES
    # every shard but the last is as full as --shard-bytes allows
    for info in manifest.shards[:-1]:
        assert tar_file_bytes((info.num_samples + 1) * per_sample) > SHARD_BYTES


@pytest.mark.parametrize("shard_bytes", [1, 20_000, 40_000, 10_240 * 7, 64 << 20])
@pytest.mark.parametrize("seq_len", [64, 2048])
def test_samples_per_shard_fills_but_never_exceeds_shard_bytes(shard_bytes: int,
                                                               seq_len: int) -> None:
    per_sample = lm_sample_tar_bytes(seq_len, "uint16")
    n = lm_samples_per_shard(shard_bytes, seq_len, "uint16")
    assert n >= 1
    if tar_file_bytes(per_sample) <= shard_bytes:
        assert tar_file_bytes(n * per_sample) <= shard_bytes
        assert tar_file_bytes((n + 1) * per_sample) > shard_bytes
    else:
        assert n == 1  # a limit below one sample still makes progress


def test_index_agrees_with_the_tar(lm_shards: Path, tmp_path: Path) -> None:
    """The offsets written while writing equal what a full tar scan finds, for text shards and
    for task shards with a mask and meta.json per sample."""
    assert main(["mqar", "--out", str(tmp_path), "--seq-len", "64", "--vocab-size", "64",
                 "--num-pairs", "4", "--train", "20", "--valid", "0", "--test", "0"]) == 0
    for split in (lm_shards / "train", tmp_path / "train"):
        manifest = read_manifest(split)
        for info in manifest.shards[:3]:
            index = np.load(split / info.index)
            found = np.full_like(index, -1)
            for member in _members(split / info.path):
                local = int(member.name[1:11]) - info.first_sample_id
                ext = member.name[12:]
                if ext == "meta.json":
                    found[local, 2:] = (member.offset_data, member.size)
                else:
                    column = 0 if ext == "tokens.npy" else 1
                    array_bytes = (SEQ_LEN + 1) * 2 if column == 0 else SEQ_LEN
                    found[local, column] = member.offset_data + member.size - array_bytes
            np.testing.assert_array_equal(index, found)
    ds = TokenShardDataset(tmp_path / "train")
    assert ds.meta(7) is not None and ds.mask_numpy(7).sum() > 0
    assert ds.regenerate_command.startswith(f"sessa-data mqar --out {tmp_path} --seq-len 64")


def test_webdataset_reads_the_shards(lm_shards: Path) -> None:
    ds = TokenShardDataset(lm_shards / "train")
    info = ds.manifest.shards[1]
    samples = list(wds.WebDataset(str(lm_shards / "train" / info.path), shardshuffle=False))
    assert [s["__key__"] for s in samples][:2] == [f"s{info.first_sample_id:010d}",
                                                   f"s{info.first_sample_id + 1:010d}"]
    for local, sample in enumerate(samples):
        expected = ds.tokens_numpy(info.first_sample_id + local)
        assert sample["tokens.npy"] == npy_bytes(expected)


def test_old_format_version_names_the_regenerate_command(lm_shards: Path,
                                                         tmp_path: Path) -> None:
    data = json.loads((lm_shards / "train" / "manifest.json").read_text())
    data["format_version"] = 1
    for shard in data["shards"]:  # version 1 had no index files
        del shard["index"], shard["index_sha256"]
    old = tmp_path / "old" / "train" / "manifest.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        TokenShardDataset(old)
    message = str(err.value)
    assert f"format_version 1, this code reads version {FORMAT_VERSION}" in message
    inputs = " ".join(data["sources"]["inputs"])
    assert (f"sessa-data tokenize --input {inputs} --tokenizer {data['tokenizer']['path']} "
            f"--seq-len {SEQ_LEN} --out {tmp_path / 'old'} --shard-bytes {SHARD_BYTES} "
            "--valid-fraction 0.1 --overwrite") in message
