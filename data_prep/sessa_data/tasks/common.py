"""What every task generator shares: per-example seeding, padding and masking, task vocabulary
hashes, and writing a split of examples as shards with a manifest.

An example is a token list plus the positions of its target tokens. In the stored sample the
tokens are padded with ``pad_id`` to ``seq_len + 1``; the mask (aligned with the labels
``tokens[1:]``) is 1 exactly where the label is a target token.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sessa_data.shard_writer import Sample, write_shard
from sessa_pt.data.manifest import Manifest, token_dtype_for_vocab, write_manifest


@dataclass
class TaskExample:
    tokens: list[int]
    targets: list[int]  # positions in ``tokens`` whose token is an answer (never 0)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskVocab:
    """A task's vocabulary: its size, pad id and a hash of its definition."""

    name: str
    size: int
    pad_id: int
    definition: dict[str, Any]

    @property
    def sha256(self) -> str:
        text = json.dumps({"task": self.name, "size": self.size, "pad_id": self.pad_id,
                           "definition": self.definition}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def example_rng(task: str, seed: int, split: str, index: int) -> random.Random:
    """An independent, reproducible generator for one example."""
    digest = hashlib.sha256(f"{task}:{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def to_sample(example: TaskExample, seq_len: int, pad_id: int) -> Sample:
    n = len(example.tokens)
    if n > seq_len + 1:
        raise ValueError(f"example of {n} tokens does not fit seq_len + 1 = {seq_len + 1}")
    if any(not 1 <= t < n for t in example.targets):
        raise ValueError("target positions must be in [1, len(tokens))")
    tokens = np.full(seq_len + 1, pad_id, dtype=np.int64)
    tokens[:n] = example.tokens
    mask = np.zeros(seq_len, dtype=np.uint8)
    mask[np.asarray(example.targets, dtype=np.int64) - 1] = 1
    return Sample(tokens=tokens, mask=mask, meta=example.meta)


_MAKE: Callable[[int], TaskExample] | None = None   # the generator, inherited by forked workers


def _write_one_shard(job: tuple[Path, int, int, int, int, str]) -> Any:
    path, first, count, seq_len, pad_id, dtype = job
    samples = [to_sample(_MAKE(first + i), seq_len, pad_id) for i in range(count)]
    return write_shard(path, samples, first, dtype)


def write_task_split(out: Path, split: str, make: Callable[[int], TaskExample],
                     num_examples: int, seq_len: int, vocab: TaskVocab,
                     tokenizer_sha256: str | None, generator: dict[str, Any],
                     examples_per_shard: int = 4096,
                     tokenizer: dict[str, Any] | None = None, workers: int = 1) -> Manifest:
    """Generate ``num_examples`` examples with ``make(index)`` and write ``out/<split>/``.

    ``workers > 1`` writes shards in forked processes; examples are seeded per index, so the
    output is byte-identical for any worker count."""
    global _MAKE
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    directory = out / split
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype_for_vocab(vocab.size)
    jobs = [(directory / f"{split}-{n:06d}.tar", first,
             min(examples_per_shard, num_examples - first), seq_len, vocab.pad_id, dtype)
            for n, first in enumerate(range(0, num_examples, examples_per_shard))]
    _MAKE = make
    shards = []
    with tqdm(total=num_examples, desc=f"{vocab.name} {split}", unit="ex") as bar:
        if workers > 1 and len(jobs) > 1:
            # fork: the closure ``make`` is not picklable, the children inherit it instead
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for job, info in zip(jobs, pool.imap(_write_one_shard, jobs), strict=True):
                    shards.append(info)
                    bar.update(job[2])
        else:
            for job in jobs:
                shards.append(_write_one_shard(job))
                bar.update(job[2])
    manifest = Manifest(
        kind="task", split=split, seq_len=seq_len, vocab_size=vocab.size, token_dtype=dtype,
        tokenizer_sha256=tokenizer_sha256 or vocab.sha256, has_mask=True, pad_id=vocab.pad_id,
        num_samples=num_examples, num_tokens=sum(s.num_tokens for s in shards), shards=shards,
        tokenizer=tokenizer or {"task_vocab": vocab.name, "vocab_size": vocab.size,
                                "sha256": vocab.sha256, "definition": vocab.definition},
        generator={"task": vocab.name, **generator},
    )
    write_manifest(manifest, directory / "manifest.json")
    return manifest
