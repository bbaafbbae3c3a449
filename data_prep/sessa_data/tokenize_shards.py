"""``sessa-data tokenize``: documents -> sentencepiece ids -> packed samples -> shards.

Documents are read in a fixed order, split into train/valid by a hash of their id (or by
source), tokenized by sentencepiece's native threads (results are consumed in input order, so
the output does not depend on the number of workers), packed by :mod:`sessa_data.packing`, and
written as shards under ``OUT/<split>/`` with a ``manifest.json`` each. After each finished
shard the run state is saved; a run started again on the same output resumes and gives
byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from sessa_data.documents import Document, expand_inputs, iter_documents
from sessa_data.packing import StreamPacker
from sessa_data.resume_state import RunState, SplitState, load_state, save_state, state_dir
from sessa_data.shard_writer import Sample, lm_samples_per_shard, write_shard
from sessa_data.tokenizer_train import tokenizer_info
from sessa_pt.data.manifest import (
    FORMAT_VERSION,
    Manifest,
    sha256_file,
    token_dtype_for_vocab,
    write_manifest,
)

log = logging.getLogger(__name__)

KILL_HOOK_ENV = "SESSA_DATA_KILL_AFTER_SHARDS"  # tests: SIGKILL self after N new shards
CHUNK_CHARS = 1 << 20


@dataclass
class TokenizeConfig:
    inputs: list[str]
    tokenizer: str
    seq_len: int
    out: str
    shard_bytes: int = 64 << 20
    workers: int = 1  # sentencepiece encoding threads
    valid_fraction: float = 0.0
    valid_sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    add_bos: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"--seq-len must be positive, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_bytes <= 0:
            raise ValueError(f"--shard-bytes must be positive, got {self.shard_bytes}")
        if isinstance(self.valid_sources, str):
            raise TypeError(f"valid_sources must be a list of source names, got the string "
                            f"{self.valid_sources!r}")


def split_of(doc: Document, valid_fraction: float, valid_sources: Iterable[str]) -> str:
    """'valid' or 'train', from the document's source or a hash of its id (never random)."""
    if doc.source in valid_sources:
        return "valid"
    if valid_fraction > 0.0:
        digest = hashlib.sha256(doc.doc_id.encode("utf-8")).digest()
        if int.from_bytes(digest[:8], "big") / 2.0**64 < valid_fraction:
            return "valid"
    return "train"


class _OrderedEncoder:
    """Tokenize chunks of documents with sentencepiece's own thread pool, in input order.

    ``encode(texts, num_threads=N)`` runs N native threads over the batch and releases the GIL
    while it does, so one helper thread encodes the next chunk while the caller packs and writes
    the previous one. Ids are those of one-by-one encoding (``tests/data`` checks that shards
    are identical for any worker count). At most two chunks are held at once.
    """

    def __init__(self, model_path: str, workers: int) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.workers = workers
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sentencepiece")

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self.sp.encode(texts, num_threads=self.workers, return_type="numpy")
        return [ids.astype(np.uint32) for ids in encoded]

    def run(self, chunks: Iterator[list[tuple[int, str, Document]]]
            ) -> Iterator[tuple[list[tuple[int, str, Document]], list[np.ndarray]]]:
        previous: tuple[list[tuple[int, str, Document]], Future[list[np.ndarray]]] | None = None
        for chunk in chunks:
            future = self.executor.submit(self._encode, [d.text for _, _, d in chunk])
            if previous is not None:
                yield previous[0], previous[1].result()
            previous = (chunk, future)
        if previous is not None:
            yield previous[0], previous[1].result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- main side
def _chunks(docs: Iterator[tuple[int, str, Document]]
            ) -> Iterator[list[tuple[int, str, Document]]]:
    chunk: list[tuple[int, str, Document]] = []
    chars = 0
    for item in docs:
        chunk.append(item)
        chars += len(item[2].text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _fingerprint(cfg: TokenizeConfig, paths: list[Path], tok_sha: str) -> str:
    described = {
        "inputs": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths],
        "tokenizer_sha256": tok_sha, "seq_len": cfg.seq_len, "shard_bytes": cfg.shard_bytes,
        "valid_fraction": cfg.valid_fraction, "valid_sources": sorted(cfg.valid_sources),
        "text_field": cfg.text_field, "add_bos": cfg.add_bos, "format_version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _source_licenses(paths: list[Path]) -> dict[str, Any]:
    """Records from ``sources.json`` files written by ``fetch`` next to the inputs."""
    found: dict[str, Any] = {}
    for directory in sorted({p.parent for p in paths}):
        record = directory / "sources.json"
        if record.is_file():
            found.update(json.loads(record.read_text(encoding="utf-8")).get("sources", {}))
    return found


class _Run:
    """One tokenize run: the packers, the state and the shard writing."""

    def __init__(self, cfg: TokenizeConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.paths = expand_inputs(cfg.inputs)
        self.tok = tokenizer_info(cfg.tokenizer)
        self.dtype = token_dtype_for_vocab(self.tok.vocab_size)
        self.samples_per_shard = lm_samples_per_shard(cfg.shard_bytes, cfg.seq_len, self.dtype)
        self.fingerprint = _fingerprint(cfg, self.paths, self.tok.sha256)
        self.splits = ["train", "valid"] if (cfg.valid_fraction or cfg.valid_sources) else [
            "train"]
        self.new_shards = 0
        kill = os.environ.get(KILL_HOOK_ENV)
        self.kill_after = int(kill) if kill else None
        self.on_kill: Callable[[], None] = lambda: None

    def prepare_output(self) -> tuple[RunState, dict[str, np.ndarray]]:
        if self.cfg.overwrite and self.out.exists():
            for split in self.splits:
                shutil.rmtree(self.out / split, ignore_errors=True)
            shutil.rmtree(state_dir(self.out), ignore_errors=True)
        loaded = load_state(self.out)
        if loaded is None:
            if any((self.out / s / "manifest.json").exists() for s in self.splits):
                raise FileExistsError(
                    f"{self.out} already holds finished shards: pass --overwrite to redo them, "
                    "or choose another --out")
            for split in self.splits:
                stale = self.out / split
                if stale.exists() and any(stale.iterdir()):
                    raise FileExistsError(
                        f"{stale} has files but no resumable state: pass --overwrite")
            return RunState(self.fingerprint, splits={s: SplitState() for s in self.splits}), {}
        state, pending = loaded
        if state.fingerprint != self.fingerprint:
            raise ValueError(
                f"{self.out} holds an interrupted run with other inputs or settings; resume it "
                "with the same command, or pass --overwrite to start again")
        self._verify_finished(state)
        log.info("resuming at document %d", state.next_doc)
        return state, pending

    def _verify_finished(self, state: RunState) -> None:
        for split, split_state in state.splits.items():
            keep = {name for s in split_state.shards for name in (s.path, s.index)}
            directory = self.out / split
            for shard in tqdm(split_state.shards, desc=f"verifying {split}", leave=False):
                for name, sha in ((shard.path, shard.sha256), (shard.index, shard.index_sha256)):
                    path = directory / name
                    if not path.is_file() or sha256_file(path) != sha:
                        raise RuntimeError(
                            f"finished shard file {path} is missing or changed since it was "
                            "written; the run cannot resume: pass --overwrite to start again")
            if directory.exists():
                for stray in directory.iterdir():  # shards after the checkpoint, temp files
                    if stray.name not in keep:
                        stray.unlink()

    def write(self, split: str, state: SplitState, block: np.ndarray) -> None:
        first = state.num_samples
        name = f"{split}-{len(state.shards):06d}.tar"
        samples = [Sample(tokens=row) for row in block]
        state.shards.append(write_shard(self.out / split / name, samples, first, self.dtype))
        self.new_shards += 1
        if self.kill_after is not None and self.new_shards >= self.kill_after:
            self.on_kill()  # no orphaned workers; the main process then dies abruptly
            os.kill(os.getpid(), signal.SIGKILL)

    def manifest(self, split: str, state: SplitState, dropped: int,
                 licenses: dict[str, Any]) -> Manifest:
        tok = self.tok
        return Manifest(
            kind="lm", split=split, seq_len=self.cfg.seq_len, vocab_size=tok.vocab_size,
            token_dtype=self.dtype, tokenizer_sha256=tok.sha256, has_mask=False,
            pad_id=tok.pad_id if tok.pad_id >= 0 else None,
            num_samples=state.num_samples, num_tokens=sum(s.num_tokens for s in state.shards),
            shards=state.shards,
            tokenizer={"path": str(Path(tok.model_path).resolve()), "sha256": tok.sha256,
                       "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                       "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id},
            sources={"documents": state.docs, "per_source": state.sources,
                     "licenses": {k: v for k, v in licenses.items() if k in state.sources},
                     "inputs": [str(p) for p in self.paths]},
            generator={"tool": "sessa-data tokenize", "packing": "overlap-1",
                       "eos_between_documents": True, "add_bos": self.cfg.add_bos,
                       "valid_fraction": self.cfg.valid_fraction,
                       "valid_sources": sorted(self.cfg.valid_sources),
                       "samples_per_shard": self.samples_per_shard,
                       "shard_bytes": self.cfg.shard_bytes, "text_field": self.cfg.text_field},
            extra={"dropped_tail_tokens": dropped},
        )


def tokenize_to_shards(cfg: TokenizeConfig) -> dict[str, Manifest]:
    """Run (or resume) a tokenize job; return the manifests written per split."""
    run = _Run(cfg)
    state, pending = run.prepare_output()
    packers = {s: StreamPacker(cfg.seq_len, run.samples_per_shard, pending.get(s))
               for s in run.splits}
    eos = run.tok.eos_id
    bos = run.tok.bos_id
    if eos < 0 or (cfg.add_bos and bos < 0):
        raise ValueError(f"tokenizer {cfg.tokenizer} lacks an eos (or bos) id")

    def labelled() -> Iterator[tuple[int, str, Document]]:
        for index, doc in enumerate(iter_documents(run.paths, cfg.text_field)):
            if index >= state.next_doc:
                yield index, split_of(doc, cfg.valid_fraction, cfg.valid_sources), doc

    encoder = _OrderedEncoder(cfg.tokenizer, cfg.workers)
    run.on_kill = encoder.close
    bar = tqdm(desc="tokenizing", unit="doc", initial=state.next_doc)
    try:
        for chunk, ids_list in encoder.run(_chunks(labelled())):
            for (index, split, doc), ids in zip(chunk, ids_list, strict=True):
                parts = [ids, np.array([eos], dtype=np.uint32)]
                if cfg.add_bos:
                    parts.insert(0, np.array([bos], dtype=np.uint32))
                tokens = np.concatenate(parts)
                split_state = state.splits[split]
                split_state.docs += 1
                counts = split_state.sources.setdefault(doc.source, {"documents": 0,
                                                                     "tokens": 0})
                counts["documents"] += 1
                counts["tokens"] += len(tokens)
                packers[split].add(tokens)
                wrote = False
                while (block := packers[split].full_shard()) is not None:
                    run.write(split, split_state, block)
                    wrote = True
                if wrote:
                    state.next_doc = index + 1
                    save_state(run.out, state, {s: p.pending() for s, p in packers.items()})
                bar.update(1)
    finally:
        bar.close()
        encoder.close()
    licenses = _source_licenses(run.paths)
    manifests: dict[str, Manifest] = {}
    for split in run.splits:
        block, dropped = packers[split].final_shard()
        if block is not None:
            run.write(split, state.splits[split], block)
        if state.splits[split].num_samples == 0:
            log.warning("split %s got no complete sample; no manifest written", split)
            continue
        manifest = run.manifest(split, state.splits[split], dropped, licenses)
        write_manifest(manifest, run.out / split / "manifest.json")
        manifests[split] = manifest
    shutil.rmtree(state_dir(run.out), ignore_errors=True)
    return manifests


def describe(manifests: dict[str, Manifest]) -> str:
    lines = []
    for split, m in manifests.items():
        lines.append(f"{split}: {m.num_samples} samples, {m.num_tokens} tokens, "
                     f"{len(m.shards)} shards -> {m.path}")
    return "\n".join(lines)

