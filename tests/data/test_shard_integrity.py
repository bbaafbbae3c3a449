"""Damaged shards and bad token ids are caught before a model sees them: checksums on first
read (once per shard per rank, also across DataLoader workers) and token ids against the
vocabulary, each failing with the shard's name and what to do."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import sessa_pt.data.dataset as dataset_module
from sessa_data.shard_writer import Sample, write_shard
from sessa_pt.data import (
    Manifest,
    ShardCorruptError,
    TokenIdError,
    TokenShardDataset,
    build_eval_loader,
    build_train_loader,
    read_manifest,
)
from sessa_pt.data.manifest import sha256_file, write_manifest

SEQ_LEN = 64


def _copy_split(lm_shards: Path, tmp_path: Path) -> Path:
    target = tmp_path / "train"
    shutil.copytree(lm_shards / "train", target)
    return target


def _overwrite_tokens(split: Path, shard: int, local: int, ids: np.ndarray) -> Path:
    """Write ``ids`` over the token data of one sample, in place (as a disk error might)."""
    info = read_manifest(split).shards[shard]
    offset = int(np.load(split / info.index)[local, 0])
    path = split / info.path
    data = bytearray(path.read_bytes())
    raw = ids.astype(np.uint16).tobytes()
    data[offset:offset + len(raw)] = raw
    path.write_bytes(bytes(data))
    return path


def _first_index(ds: TokenShardDataset, shard: int) -> int:
    return sum(s.num_samples for s in ds.manifest.shards[:shard])


def test_overwritten_token_bytes_fail_the_checksum_on_first_read(lm_shards: Path,
                                                                 tmp_path: Path) -> None:
    split = _copy_split(lm_shards, tmp_path)
    good = TokenShardDataset(split, expected_seq_len=SEQ_LEN)
    original = good.tokens_numpy(_first_index(good, 1)).copy()
    fake = original[::-1].copy()  # in-range ids: only the checksum can tell
    assert fake.max() < good.vocab_size and not np.array_equal(fake, original)
    victim = _overwrite_tokens(split, 1, 0, fake)
    expected = read_manifest(split).shards[1].sha256

    ds = TokenShardDataset(split, expected_seq_len=SEQ_LEN)  # opening reads no shard
    ds.tokens_numpy(_first_index(ds, 2))  # other shards stay readable
    with pytest.raises(ShardCorruptError) as err:
        ds.tokens_numpy(_first_index(ds, 1) + 3)
    message = str(err.value)
    assert str(victim) in message and expected in message and sha256_file(victim) in message
    assert "sessa-data tokenize --input" in message and "--overwrite" in message
    with pytest.raises(ShardCorruptError, match="does not match its checksum"):
        ds.tokens_numpy(_first_index(ds, 1))  # a failed check is not remembered as passed

    # the same from the training loader, in a DataLoader worker process
    loader = build_train_loader(TokenShardDataset(split), seed=0, global_batch_size=1,
                                micro_batch_size=1, start_cursor=_first_index(ds, 1),
                                shuffle=False, num_workers=1)
    with pytest.raises(ShardCorruptError, match=f"{victim.name} does not match its checksum"):
        next(iter(loader))


def test_damaged_index_is_caught(lm_shards: Path, tmp_path: Path) -> None:
    split = _copy_split(lm_shards, tmp_path)
    info = read_manifest(split).shards[2]
    index = np.load(split / info.index)
    index[5, 0] += 2  # a shifted offset would read the wrong tokens
    np.save(split / info.index, index)
    ds = TokenShardDataset(split)
    with pytest.raises(ShardCorruptError, match=f"{info.index} does not match its checksum"):
        ds.tokens_numpy(_first_index(ds, 2))
    (split / info.index).unlink()
    with pytest.raises(ShardCorruptError, match=f"shard index .*{info.index} is missing"):
        TokenShardDataset(split)


def test_each_shard_is_verified_once_per_rank(lm_shards: Path, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Two training iterators with two DataLoader workers each, then evaluation in the main
    process, read every shard; each shard is hashed exactly once."""
    log = tmp_path / "verified.log"
    real = dataset_module.verify_shard

    def logged(path: Path, *args: object) -> None:
        real(path, *args)
        with open(log, "a") as handle:  # one short append per line: atomic across processes
            handle.write(f"{os.getpid()} {path.name}\n")

    monkeypatch.setattr(dataset_module, "verify_shard", logged)  # workers fork and inherit it
    ds = TokenShardDataset(lm_shards / "train", expected_seq_len=SEQ_LEN)
    g = 16
    steps = -(-ds.num_samples // g)  # one epoch: every sample, so every shard
    for _ in range(2):
        loader = build_train_loader(ds, seed=3, global_batch_size=g, micro_batch_size=g,
                                    num_workers=2)
        for count, _batch in enumerate(loader, start=1):
            if count == steps:
                break
    for _batch in build_eval_loader(ds, micro_batch_size=64):
        pass
    lines = log.read_text().split()
    names = Counter(lines[1::2])
    assert names == Counter(Path(p).name for p in ds.shard_paths)  # each once
    assert len(set(lines[0::2])) >= 2 and str(os.getpid()) not in lines[0::2]  # by workers


def _write_split(directory: Path, rows: list[np.ndarray], vocab_size: int) -> Path:
    """A text split of one shard holding ``rows`` (written as any writer would)."""
    info = write_shard(directory / "train-000000.tar", [Sample(tokens=r) for r in rows], 0,
                       "uint16")
    manifest = Manifest(kind="lm", split="train", seq_len=len(rows[0]) - 1,
                        vocab_size=vocab_size, token_dtype="uint16", tokenizer_sha256="0" * 64,
                        has_mask=False, pad_id=None, num_samples=len(rows),
                        num_tokens=info.num_tokens, shards=[info],
                        generator={"tool": "sessa-data tokenize", "shard_bytes": 1 << 20},
                        sources={"inputs": ["corpus.jsonl"]},
                        tokenizer={"path": "tok.model"})
    write_manifest(manifest, directory / "manifest.json")
    return directory / "manifest.json"


def test_token_ids_beyond_the_vocabulary_name_shard_and_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 60, size=33) for _ in range(6)]
    rows[4][17] = 100  # the tokenizer has ids 0..99
    rows[2][5] = 80  # inside the tokenizer's vocabulary, beyond a 64-token model's
    path = _write_split(tmp_path, rows, vocab_size=100)
    ds = TokenShardDataset(path)
    assert np.array_equal(ds.tokens_numpy(3), rows[3])  # checksums are fine
    with pytest.raises(TokenIdError) as err:
        ds.tokens_numpy(4)
    message = str(err.value)
    assert "train-000000.tar: sample 4" in message and "token id 100 at position 17" in message
    assert "0..99" in message and "sessa-data tokenize" in message
    # the training loader fails the same way, from a worker process
    loader = build_train_loader(ds, seed=0, global_batch_size=6, micro_batch_size=6,
                                num_workers=1)
    with pytest.raises(TokenIdError, match="train-000000.tar: sample 4"):
        next(iter(loader))
    # against the model's smaller vocabulary (what the trainer passes)
    small = TokenShardDataset(path, model_vocab_size=64)
    with pytest.raises(TokenIdError, match=r"sample 2 .* token id 80 at position 5.*"
                                           r"model.vocab_size=64"):
        next(iter(build_eval_loader(small, micro_batch_size=6)))
    with pytest.raises(ValueError, match="outside"):  # a negative id never wraps silently
        write_shard(tmp_path / "bad.tar", [Sample(tokens=np.array([1, -1, 2]))], 0, "uint16")
