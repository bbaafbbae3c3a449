"""The README's main job on the embedded default: fetch the small real corpus, train a
tokenizer, write shards, and train a small Sessa LM on CPU with torchrun (2 processes, TP=2),
logging to the local mlflow store. Run through ``./quickstart.sh`` (which sets up .venv first).

Every step is skipped when its output already exists, so a second run goes straight to training
(and resumes it, if a checkpoint is there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The data the quick start writes; recipes/tiny reads these paths, vocabulary and length.
DATA_DIR = pathlib.Path("data/quickstart")
VOCAB_SIZE = 2048
SEQ_LEN = 128


def data_layout(data: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(corpus dir, tokenizer prefix, shards dir) under a quick-start data dir."""
    return data / "corpus", data / "tokenizer" / "spm2k", data / "shards"


def run(cmd: list[str], **kw) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def unigram_entropy(manifest: pathlib.Path) -> float:
    """Entropy (nats/token) of the train shards' token frequencies: the loss of the best model
    that ignores context."""
    from sessa_pt.data import TokenShardDataset

    ds = TokenShardDataset(manifest)
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    for i in range(0, ds.num_samples, max(1, ds.num_samples // 4000)):
        counts += np.bincount(ds.tokens_numpy(i)[1:], minlength=ds.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DATA_DIR))
    p.add_argument("--recipe", default="recipes/tiny/sessa.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="extra key=value training overrides "
                                                "(default: parallel.tp=2)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    py = sys.executable
    data = pathlib.Path(args.data_dir)
    corpus, tok, shards = data_layout(data)
    data_cli = [py, "-m", "sessa_data.cli"]
    if not (corpus / "sources.json").exists():
        run(data_cli + ["fetch", "--preset", "small", "--out", str(corpus)])
    if not tok.with_suffix(".model").exists():
        run(data_cli + ["train-tokenizer", "--input", str(corpus), "--vocab-size", str(VOCAB_SIZE),
                        "--model-type", "bpe", "--out", str(tok)])
    if not (shards / "valid" / "manifest.json").exists():
        run(data_cli + ["tokenize", "--input", str(corpus), "--tokenizer",
                        str(tok.with_suffix(".model")), "--seq-len", str(SEQ_LEN), "--out",
                        str(shards), "--workers", "2", "--valid-fraction", "0.02"])
    overrides = args.overrides or ["parallel.tp=2"]
    from sessa_pt.train.tracking import mlflow_env

    env = mlflow_env(None, dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS",
                                                                          "1")))
    run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(args.nproc), "-m", "sessa_pt.train", args.recipe,
         f"data.train={shards}/train/manifest.json", f"data.valid={shards}/valid/manifest.json",
         *overrides], env=env)
    from sessa_pt.config import load_config

    cfg = load_config(args.recipe, overrides)
    summary = json.loads((pathlib.Path(cfg.run.dir) / "summary.json").read_text())
    h = unigram_entropy(shards / "train" / "manifest.json")
    val = None
    log = pathlib.Path(cfg.run.dir) / "train_log.jsonl"
    print("\n=== sessa_pt quick start done ===")
    print(f"checkpoint:      {summary['checkpoint']}")
    print(f"mlflow run:      {summary['mlflow_run_id']}  ({summary['tracking_uri']})")
    print(f"browse with:     mlflow ui --backend-store-uri {summary['tracking_uri']}")
    last = [json.loads(x) for x in log.read_text().splitlines()][-1]
    print(f"final train loss {last['loss']:.3f} nats/token; unigram entropy of the corpus "
          f"{h:.3f} nats/token (ppl {math.exp(h):.0f})")
    val = summary.get("val_loss")
    if val is not None:
        print(f"final val loss   {val:.3f} nats/token (ppl {math.exp(val):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
