"""Sentencepiece encoding: the tokenizer's own threads (what ``sessa-data tokenize`` uses) against
a pool of worker processes, on the same 1 MB chunks, with wall and CPU time and an identity check.

``python -m sessa_data.bench_encode --input CORPUS --tokenizer MODEL [--workers 2 --repeats 5]``
prints one line per run; compare the fastest wall time of each mode on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import sentencepiece as spm

from sessa_data.documents import expand_inputs, iter_documents
from sessa_data.tokenize_shards import CHUNK_CHARS, _OrderedEncoder

_POOL_SP: spm.SentencePieceProcessor | None = None


def _pool_init(model: str) -> None:
    global _POOL_SP
    _POOL_SP = spm.SentencePieceProcessor(model_file=model)


def _pool_encode(texts: list[str]) -> list[np.ndarray]:
    assert _POOL_SP is not None
    return [np.asarray(ids, dtype=np.uint32) for ids in _POOL_SP.encode(texts)]


class _Doc:  # what the encoder reads of a Document
    def __init__(self, text: str) -> None:
        self.text = text


def _threads(model: str, workers: int, chunks: list[list[str]]) -> list[np.ndarray]:
    encoder = _OrderedEncoder(model, workers)
    try:
        items = ([(0, "", _Doc(t)) for t in chunk] for chunk in chunks)
        return [ids for _, encoded in encoder.run(items) for ids in encoded]
    finally:
        encoder.close()


def _processes(model: str, workers: int, chunks: list[list[str]]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    with mp.get_context("fork").Pool(workers, initializer=_pool_init, initargs=(model,)) as pool:
        inflight = []
        for chunk in chunks:  # at most 2 * workers chunks in flight, results in order
            inflight.append(pool.apply_async(_pool_encode, (chunk,)))
            if len(inflight) >= 2 * workers:
                out += inflight.pop(0).get()
        for result in inflight:
            out += result.get()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sessa_data.bench_encode", description=__doc__)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-chars", type=int, default=0, help="read only this much text")
    args = p.parse_args(argv)
    chunks: list[list[str]] = [[]]
    size = total = 0
    for doc in iter_documents(expand_inputs(args.input)):
        chunks[-1].append(doc.text)
        size += len(doc.text)
        total += len(doc.text)
        if size >= CHUNK_CHARS:
            chunks.append([])
            size = 0
        if args.max_chars and total >= args.max_chars:
            break
    modes: dict[str, Callable[[], list[np.ndarray]]] = {
        "threads 1": lambda: _threads(args.tokenizer, 1, chunks),
        f"threads {args.workers}": lambda: _threads(args.tokenizer, args.workers, chunks),
        f"processes {args.workers}": lambda: _processes(args.tokenizer, args.workers, chunks),
    }
    reference: list[np.ndarray] | None = None
    print(f"{total / 1e6:.1f} M characters in {len(chunks)} chunks, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for repeat in range(args.repeats):
        for name, run in modes.items():
            before, start = os.times(), time.perf_counter()
            out = run()
            wall, after = time.perf_counter() - start, os.times()
            cpu = (after.user - before.user + after.system - before.system
                   + after.children_user - before.children_user
                   + after.children_system - before.children_system)
            reference = out if reference is None else reference
            same = len(out) == len(reference) and all(
                np.array_equal(a, b) for a, b in zip(out, reference, strict=True))
            tokens = sum(len(ids) for ids in out)
            print(f"run {repeat} {name:12s} wall {wall:6.2f} s ({tokens / wall / 1e6:.2f} M tok/s)"
                  f"  cpu {cpu:6.2f} s  identical={same}  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
