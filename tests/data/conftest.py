"""Fixtures for the data pipeline tests: a small real corpus (Jane Austen, fetched once and kept
in pytest's cache), a tokenizer trained on it, and shards made from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sessa_data.fetch import fetch
from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
from sessa_data.tokenizer_train import train_tokenizer

SEQ_LEN = 64
SHARD_BYTES = 40_000  # small shards so the tests cross many shard boundaries


@pytest.fixture(scope="session")
def austen_jsonl(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Austen's novels fetched from Debian (kept in pytest's cache across sessions)."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("sessa_data_austen")) if cache else tmp_path_factory.mktemp("au")
    fetch(["austen"], root / "corpus", root / "packages")
    return root / "corpus" / "austen.jsonl"


@pytest.fixture(scope="session")
def chapters(austen_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two novels cut into chapters: ~110 real documents, ~1.3 MB."""
    out = tmp_path_factory.mktemp("chapters") / "chapters.jsonl"
    with open(austen_jsonl, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            novel = json.loads(line)
            if novel["doc_id"] not in ("austen/persuasion", "austen/northangerabbey"):
                continue
            parts = re.split(r"\n(?=CHAPTER [IVXLC0-9]+\n|Chapter \d+\n)", novel["text"])
            dst.writelines(json.dumps({"text": part, "source": "austen",
                                      "doc_id": f"{novel['doc_id']}/{i}"}) + "\n" for i, part in enumerate(parts))
    return out


@pytest.fixture(scope="session")
def tokenizer(chapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "bpe1k"
    train_tokenizer([str(chapters)], 1000, "bpe", str(prefix))
    return Path(f"{prefix}.model")


def tokenize_config(chapters: Path, tokenizer: Path, out: Path, workers: int = 2,
                    ) -> TokenizeConfig:
    return TokenizeConfig(inputs=[str(chapters)], tokenizer=str(tokenizer), seq_len=SEQ_LEN,
                          out=str(out), shard_bytes=SHARD_BYTES, workers=workers,
                          valid_fraction=0.1)


@pytest.fixture(scope="session")
def make_tokenize_config(chapters: Path, tokenizer: Path):
    """A factory for the tokenize settings every test compares against."""

    def make(out: Path, workers: int = 2) -> TokenizeConfig:
        return tokenize_config(chapters, tokenizer, out, workers)

    return make


@pytest.fixture(scope="session")
def lm_shards(chapters: Path, tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    tokenize_to_shards(tokenize_config(chapters, tokenizer, out))
    return out
