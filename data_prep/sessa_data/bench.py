"""Data pipeline benchmark: tokenization throughput and loader throughput (tokens/s per rank).

Run ``python -m sessa_data.bench --corpus DIR --work DIR``: fetches the large mix if ``DIR`` has
no ``sources.json``, trains a tokenizer, tokenizes with 1 and N workers, then reads the train
split with the training loader as rank 0 of DP=1 and DP=2, and prints a table (markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from sessa_data.fetch import fetch, preset_sources
from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
from sessa_data.tokenizer_train import train_tokenizer
from sessa_pt.data import TokenShardDataset, build_train_loader


def _corpus_bytes(corpus: Path) -> int:
    record = json.loads((corpus / "sources.json").read_text())
    return sum(s["bytes"] for s in record["sources"].values())


def bench_loader(ds: TokenShardDataset, dp_size: int, micro_batch: int, steps: int,
                 num_workers: int) -> float:
    """Tokens/s delivered to rank 0 (input_ids tokens), after a short warm-up."""
    g = micro_batch * dp_size
    loader = build_train_loader(ds, seed=0, global_batch_size=g, micro_batch_size=micro_batch,
                                dp_rank=0, dp_size=dp_size, num_workers=num_workers)
    it = iter(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sessa_data.bench", description=__doc__)
    p.add_argument("--corpus", default="runs/data/large", help="fetched corpus directory")
    p.add_argument("--work", default="runs/data/bench", help="tokenizer and shards go here")
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    corpus, work = Path(args.corpus), Path(args.work)
    if not (corpus / "sources.json").is_file():
        fetch(preset_sources("large"), corpus, preset="large")
    mbytes = _corpus_bytes(corpus) / 1e6
    rows: list[tuple[str, str]] = [("corpus", f"{mbytes:.1f} MB")]

    start = time.perf_counter()
    tok = train_tokenizer([str(corpus)], args.vocab_size, "bpe", str(work / "tok" / "spm"))
    rows.append((f"train-tokenizer (bpe {args.vocab_size})",
                 f"{time.perf_counter() - start:.1f} s"))
    ds = None
    for workers in sorted({1, args.workers}):
        out = work / f"shards-w{workers}"
        cfg = TokenizeConfig(inputs=[str(corpus)], tokenizer=tok.model_path,
                             seq_len=args.seq_len, out=str(out), workers=workers,
                             valid_sources=["austen"], overwrite=True)
        start = time.perf_counter()
        manifests = tokenize_to_shards(cfg)
        seconds = time.perf_counter() - start
        total = sum(m.num_tokens for m in manifests.values())
        rows.append((f"tokenize, {workers} worker(s)",
                     (f"{total / seconds / 1e6:.2f} M tok/s ({mbytes / seconds:.1f} MB/s, "
                     f"{total / 1e6:.1f} M tokens)")))
        ds = TokenShardDataset(out / "train", expected_seq_len=args.seq_len,
                               expected_tokenizer_hash=tok.sha256)
    assert ds is not None
    for dp in (1, 2):
        for nw in (0, 2):
            rate = bench_loader(ds, dp, args.micro_batch, args.steps, nw)
            rows.append(((f"loader rank 0 of DP={dp}, b={args.micro_batch}, L={args.seq_len}, "
                         f"workers={nw}"), f"{rate / 1e6:.2f} M tok/s"))
    print(f"# data benchmark {datetime.date.today()} "
          f"(`python -m sessa_data.bench {' '.join(argv or sys.argv[1:])}`)")
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
