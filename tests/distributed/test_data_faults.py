"""Token ids beyond the vocabulary stop training under tensor parallelism too (TP=2 would
otherwise train silently: the vocab-parallel embedding masks ids it does not own), with an
error naming the shard and the sample."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sessa_data.shard_writer import Sample, write_shard
from sessa_pt.data import TokenShardDataset, read_manifest
from sessa_pt.data.manifest import write_manifest
from tests.distributed.conftest import tiny_overrides, torchrun

pytestmark = pytest.mark.slow


def _split_with_bad_ids(manifest_path: str, out: Path, bad_id: int) -> Path:
    """A copy of a split, rewritten by the shard writer, whose samples all end in ``bad_id``."""
    ds = TokenShardDataset(manifest_path)
    m = ds.manifest
    shards, first = [], 0
    for number, info in enumerate(m.shards):
        samples = []
        for local in range(info.num_samples):
            tokens = ds.tokens_numpy(first + local).copy()
            tokens[-1] = bad_id
            samples.append(Sample(tokens=tokens))
        shards.append(write_shard(out / f"train-{number:06d}.tar", samples, first,
                                  m.token_dtype))
        first += info.num_samples
    write_manifest(dataclasses.replace(m, shards=shards), out / "manifest.json")
    return out / "manifest.json"


def test_tp2_refuses_token_ids_beyond_the_vocabulary(lm_data, tmp_path):
    vocab = read_manifest(lm_data["train"]).vocab_size
    bad = _split_with_bad_ids(lm_data["train"], tmp_path / "bad", vocab + 88)
    overrides = tiny_overrides(lm_data, **{"data.train": str(bad),
                                           "parallel.tp": 2, "train.steps": 2,
                                           "run.dir": str(tmp_path / "run")})
    proc = torchrun(2, ["-m", "sessa_pt.train", "recipes/tiny/sessa.yaml", *overrides],
                    check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"has token id {vocab + 88} at position 32" in output
    assert "bad/train-0000" in output and ".tar: sample " in output
    log = tmp_path / "run" / "train_log.jsonl"
    assert not log.exists() or not log.read_text().strip()  # not one step on such data
