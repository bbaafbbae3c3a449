"""The loader contract: exactly-once epochs for any DP size, exact resume (also when DP changes),
worker-independent order, eval coverage, and refusal of mismatched or corrupt shards."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sessa_pt.data import (
    DataCursor,
    ManifestError,
    ShardCorruptError,
    TokenShardDataset,
    build_eval_loader,
    build_train_loader,
    read_manifest,
)

SEQ_LEN = 64
G, B = 16, 2


@pytest.fixture(scope="module")
def train_ds(lm_shards: Path) -> TokenShardDataset:
    return TokenShardDataset(lm_shards / "train", expected_seq_len=SEQ_LEN)


def global_batches(ds: TokenShardDataset, dp: int, steps: int, start_cursor: int = 0,
                   seed: int = 7, num_workers: int = 0) -> list[list[int]]:
    """Sample ids of each global batch, gathered from all ``dp`` ranks in rank order."""
    per_rank = []
    for rank in range(dp):
        loader = build_train_loader(ds, seed=seed, global_batch_size=G, micro_batch_size=B,
                                    dp_rank=rank, dp_size=dp, start_cursor=start_cursor,
                                    num_workers=num_workers)
        accum = loader.grad_accum
        ids: list[list[int]] = []
        for i, batch in enumerate(loader):
            if i % accum == 0:
                ids.append([])
            ids[-1].extend(batch["sample_ids"].tolist())
            if i + 1 == steps * accum:
                break
        assert loader.cursor == start_cursor + steps * G
        per_rank.append(ids)
    return [[i for r in range(dp) for i in per_rank[r][k]] for k in range(steps)]


def test_context_weight_needs_task_shards(train_ds: TokenShardDataset) -> None:
    with pytest.raises(ValueError, match="leave data.context_loss_weight at 0"):
        build_train_loader(train_ds, seed=1, global_batch_size=G, micro_batch_size=B,
                           context_weight=0.5)


def test_batch_contents(train_ds: TokenShardDataset) -> None:
    loader = build_train_loader(train_ds, seed=1, global_batch_size=G, micro_batch_size=B)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (B, SEQ_LEN) and batch["input_ids"].dtype == torch.long
    sample = train_ds.get(int(batch["sample_ids"][0]))
    assert torch.equal(batch["input_ids"][0], sample["tokens"][:-1])
    assert torch.equal(batch["labels"][0], sample["tokens"][1:])
    assert sample["mask"] is None and bool((batch["loss_mask"] == 1).all())


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_every_sample_exactly_once_per_epoch(train_ds: TokenShardDataset, dp: int) -> None:
    n = train_ds.num_samples
    steps = -(-2 * n // G)  # two epochs
    order = [i for batch in global_batches(train_ds, dp, steps) for i in batch]
    assert sorted(order[:n]) == list(range(n))
    assert sorted(order[n:2 * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # each epoch has its own order
    assert order[:n] != list(range(n))  # shuffled


def test_order_does_not_depend_on_dp_or_workers(train_ds: TokenShardDataset) -> None:
    ref = global_batches(train_ds, 1, 6)
    assert global_batches(train_ds, 4, 6) == ref
    assert global_batches(train_ds, 2, 6, num_workers=2) == ref
    assert global_batches(train_ds, 1, 6, seed=8) != ref


@pytest.mark.parametrize("dp_before,dp_after", [(4, 4), (4, 2), (1, 4)])
def test_resume_at_random_cursor(train_ds: TokenShardDataset, dp_before: int,
                                 dp_after: int) -> None:
    steps = 40
    ref = global_batches(train_ds, dp_before, steps)
    stop = random.Random(dp_after).randrange(1, steps - 5)
    # a run that stops after `stop` steps reports the cursor to save
    loader = build_train_loader(train_ds, seed=7, global_batch_size=G, micro_batch_size=B,
                                dp_rank=0, dp_size=dp_before)
    for i, _ in enumerate(loader):
        if i + 1 == stop * loader.grad_accum:
            break
    cursor = loader.data_cursor()
    assert cursor.samples == stop * G and cursor.step == stop
    resumed = global_batches(train_ds, dp_after, steps - stop, start_cursor=cursor.samples)
    assert resumed == ref[stop:]
    state = DataCursor.from_state_dict(cursor.state_dict())
    again = build_train_loader(train_ds, seed=7, global_batch_size=G, micro_batch_size=B,
                               start_cursor=state)
    assert next(iter(again))["sample_ids"].tolist() == ref[stop][:B]
    with pytest.raises(ValueError, match="global_batch_size"):
        build_train_loader(train_ds, seed=7, global_batch_size=2 * G, micro_batch_size=B,
                           start_cursor=state)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        build_train_loader(train_ds, seed=7, global_batch_size=G, micro_batch_size=B,
                           start_cursor=G + 1)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_eval_loader_covers_split_once(lm_shards: Path, dp: int) -> None:
    ds = TokenShardDataset(lm_shards / "valid", expected_seq_len=SEQ_LEN)
    b = 3
    seen: list[int] = []
    lengths = set()
    for rank in range(dp):
        loader = build_eval_loader(ds, micro_batch_size=b, dp_rank=rank, dp_size=dp)
        batches = list(loader)
        lengths.add(len(batches))
        for batch in batches:
            ids = batch["sample_ids"]
            pad = ids < 0
            assert bool((batch["loss_mask"][pad] == 0).all())
            assert bool((batch["loss_mask"][~pad] == 1).all())
            seen.extend(ids[~pad].tolist())
    assert len(lengths) == 1  # every rank runs the same number of batches
    assert sorted(seen) == list(range(ds.num_samples))
    first = next(iter(build_eval_loader(ds, micro_batch_size=b, dp_rank=0, dp_size=dp)))
    assert first["sample_ids"].tolist() == list(range(b))


def test_manifest_mismatch_is_refused(lm_shards: Path) -> None:
    with pytest.raises(ManifestError, match=r"seq_len=64 but the config expects seq_len=128"):
        TokenShardDataset(lm_shards / "train", expected_seq_len=128)
    with pytest.raises(ManifestError, match="tokenizer sha256 .* re-tokenize"):
        TokenShardDataset(lm_shards / "train", expected_seq_len=SEQ_LEN,
                          expected_tokenizer_hash="0" * 64)
    good = read_manifest(lm_shards / "train").tokenizer_sha256
    TokenShardDataset(lm_shards / "train", expected_seq_len=SEQ_LEN,
                      expected_tokenizer_hash=good)
    with pytest.raises(ManifestError, match="no shard manifest"):
        TokenShardDataset(lm_shards / "nonexistent")


def _copy_split(lm_shards: Path, tmp_path: Path) -> Path:
    target = tmp_path / "train"
    shutil.copytree(lm_shards / "train", target)
    return target


def test_truncated_shard_raises_naming_file(lm_shards: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    split = _copy_split(lm_shards, tmp_path)
    manifest = read_manifest(split)
    victim = split / manifest.shards[2].path
    victim.write_bytes(victim.read_bytes()[: manifest.shards[2].bytes // 2])
    with pytest.raises(ShardCorruptError, match=f"{victim.name}.*truncated"):
        TokenShardDataset(split)
    with caplog.at_level(logging.WARNING):
        ds = TokenShardDataset(split, skip_corrupt=True)
    assert victim.name in caplog.text
    assert ds.skipped_shards == [str(victim)]
    assert ds.num_samples == manifest.num_samples - manifest.shards[2].num_samples
    ids = {ds.sample_id(i) for i in range(ds.num_samples)}
    lost = set(range(manifest.shards[2].first_sample_id,
                     manifest.shards[2].first_sample_id + manifest.shards[2].num_samples))
    assert not ids & lost and len(ids) == ds.num_samples


def test_corrupt_shard_contents(lm_shards: Path, tmp_path: Path) -> None:
    split = _copy_split(lm_shards, tmp_path)
    manifest = read_manifest(split)
    victim = split / manifest.shards[1].path
    data = bytearray(victim.read_bytes())
    data[0:8] = b"garbage!"  # first member's header: no scan at open, the checksum sees it
    victim.write_bytes(bytes(data))
    ds = TokenShardDataset(split)
    with pytest.raises(ShardCorruptError, match=f"{victim.name} does not match its checksum"):
        ds.tokens_numpy(manifest.shards[0].num_samples)
    with pytest.raises(ShardCorruptError, match=f"{victim.name}.*sha256"):
        TokenShardDataset(split, verify_checksums=True)
    skipped = TokenShardDataset(split, verify_checksums=True, skip_corrupt=True)
    assert skipped.skipped_shards == [str(victim)]
    (split / manifest.shards[0].path).unlink()
    with pytest.raises(ShardCorruptError, match=f"{manifest.shards[0].path} is missing"):
        TokenShardDataset(split)


def test_bad_batch_layouts_are_refused(train_ds: TokenShardDataset) -> None:
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        build_train_loader(train_ds, seed=0, global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(train_ds, seed=0, global_batch_size=8, micro_batch_size=2,
                           dp_rank=2, dp_size=2)
    assert np.issubdtype(train_ds.tokens_numpy(0).dtype, np.unsignedinteger)
