"""Text -> sentencepiece -> packed shards: the stream is reproduced, the split is by document,
output does not depend on workers, and an interrupted run resumes to identical bytes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from sessa_data.documents import expand_inputs, iter_documents
from sessa_data.tokenize_shards import KILL_HOOK_ENV, split_of, tokenize_to_shards
from sessa_data.tokenizer_train import train_tokenizer
from sessa_pt.data import TokenShardDataset, read_manifest

SEQ_LEN = 64  # as in conftest

REPO = Path(__file__).resolve().parents[2]


def _expected_stream(chapters: Path, tokenizer: Path, split: str) -> np.ndarray:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    parts = []
    for doc in iter_documents([chapters]):
        if split_of(doc, 0.1, []) == split:
            parts += [*sp.encode(doc.text), sp.eos_id()]
    return np.array(parts, dtype=np.int64)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_shards_reproduce_packed_token_stream(lm_shards: Path, chapters: Path, tokenizer: Path,
                                              split: str) -> None:
    ds = TokenShardDataset(lm_shards / split, expected_seq_len=SEQ_LEN)
    expected = _expected_stream(chapters, tokenizer, split)
    got = np.concatenate([ds.tokens_numpy(i)[:-1] for i in range(ds.num_samples)]
                         + [ds.tokens_numpy(ds.num_samples - 1)[-1:]])
    assert ds.num_samples == (len(expected) - 1) // SEQ_LEN
    np.testing.assert_array_equal(got, expected[: len(got)])
    assert len(expected) - len(got) < SEQ_LEN  # only a tail shorter than a sample is dropped
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert ds.manifest.tokenizer_sha256 == read_manifest(lm_shards / "train").tokenizer_sha256
    assert "Anne" in sp.decode(got[:20000].tolist()) or "Catherine" in sp.decode(got.tolist())


def test_split_is_by_document(lm_shards: Path, chapters: Path) -> None:
    docs = list(iter_documents([chapters]))
    valid = {d.doc_id for d in docs if split_of(d, 0.1, []) == "valid"}
    assert 0 < len(valid) < len(docs) // 2
    train_m, valid_m = read_manifest(lm_shards / "train"), read_manifest(lm_shards / "valid")
    assert train_m.sources["documents"] + valid_m.sources["documents"] == len(docs)
    assert valid_m.sources["documents"] == len(valid)
    # the split depends on the document id only, not on position or run
    assert split_of(docs[3], 0.1, []) == split_of(docs[3], 0.1, [])
    assert split_of(docs[3], 0.0, [docs[3].source]) == "valid"


def test_output_independent_of_worker_count(lm_shards: Path, make_tokenize_config,
                                            tmp_path: Path) -> None:
    tokenize_to_shards(make_tokenize_config(tmp_path, workers=1))
    for split in ("train", "valid"):
        a, b = read_manifest(lm_shards / split), read_manifest(tmp_path / split)
        assert len(a.shards) > 3
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def _run_cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "sessa_data.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_interrupted_tokenize_resumes_byte_identical(lm_shards: Path, chapters: Path,
                                                    tokenizer: Path, make_tokenize_config,
                                                    tmp_path: Path) -> None:
    cfg = make_tokenize_config(tmp_path)
    args = ["tokenize", "--input", str(chapters), "--tokenizer", str(tokenizer), "--seq-len",
            str(cfg.seq_len), "--out", str(tmp_path), "--shard-bytes", str(cfg.shard_bytes),
            "--workers", "2", "--valid-fraction", "0.1"]
    killed = _run_cli(args, {KILL_HOOK_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / ".tokenize_state" / "state.json").is_file()
    assert not (tmp_path / "train" / "manifest.json").exists()
    partial = sorted(p.name for p in (tmp_path / "train").glob("*.tar"))
    assert 0 < len(partial) < len(read_manifest(lm_shards / "train").shards)

    resumed = _run_cli(args, {})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / ".tokenize_state").exists()
    for split in ("train", "valid"):
        ref_dir, new_dir = lm_shards / split, tmp_path / split
        ref_files = sorted(p.name for p in ref_dir.iterdir())
        assert ref_files == sorted(p.name for p in new_dir.iterdir())
        for name in ref_files:
            assert (ref_dir / name).read_bytes() == (new_dir / name).read_bytes(), name

    again = _run_cli(args, {})  # a finished output is not silently redone
    assert again.returncode == 1 and "--overwrite" in again.stderr


def test_tokenizer_training_is_deterministic(chapters: Path, tokenizer: Path,
                                             tmp_path: Path) -> None:
    info = train_tokenizer([str(chapters)], 1000, "bpe", str(tmp_path / "again"))
    assert info.sha256 == json.loads(tokenizer.with_suffix(".json").read_text())["sha256"]
    assert (info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, 3)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    text = "Captain Wentworth\n  said: \u00e9t\u00e9 \u4e2d 42"
    assert sp.decode(sp.encode(text)) == text  # byte fallback and whitespace kept
    uni = train_tokenizer([str(chapters)], 800, "unigram", str(tmp_path / "uni"))
    uni2 = train_tokenizer([str(chapters)], 800, "unigram", str(tmp_path / "uni2"))
    assert uni.sha256 == uni2.sha256 != info.sha256


def test_document_readers_agree_across_formats(tmp_path: Path) -> None:
    records = [{"text": f"document {i}\nline two", "doc_id": f"d{i}", "source": "s"}
               for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    (tmp_path / "e.txt.gz").write_bytes(gzip.compress(b"a whole text file"))
    paths = expand_inputs([str(tmp_path)])
    assert [p.name for p in paths] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet",
                                      "e.txt.gz"]
    per_file = [list(iter_documents([p])) for p in paths]
    for docs in per_file[1:4]:
        assert docs == per_file[0]
    assert per_file[4][0].text == "a whole text file" and per_file[4][0].doc_id == "e.txt.gz"
    with pytest.raises(FileNotFoundError, match="matches no"):
        expand_inputs([str(tmp_path / "*.csv")])
