"""Fixtures for the export / sampling / harness tests: a sentencepiece model and text shards
(train + valid) made by sessa-data from a small mixed corpus, and tiny random-init checkpoints of
every model family in recipes/tiny, written in the trainer's format and pointing at those
shards (so the run's tokenizer is found the way a real run's is)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import pytest
import torch
import yaml

from sessa_pt.config import load_config, to_dict
from sessa_pt.models.lm import DecoderLM
from tests.single_process_run import train_single_process

ROOT = pathlib.Path(__file__).resolve().parents[2]

# transformers copies remote code into HF_MODULES_CACHE (read when it is imported): keep it out
# of the home directory, and never touch the network.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# recipe -> small overrides (CPU-cheap; the architecture is the recipe's)
FAMILIES = {
    "sessa": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
              "model.sessa.impl=chunked", "model.sessa.chunk_size=8"],
    "transformer": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"],
    "transformer_mlp": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"],
    "mamba2": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
               "model.mamba2.d_state=8", "model.mamba2.head_dim=16",
               "model.mamba2.chunk_size=8"],
}

SENTENCES = [
    "The grass is green and the sky is blue.", "She opened the door and walked into the garden.",
    "He counted 12345 coins, then 678 more.", "Naïve café owners serve crème brûlée.",
    "Rain fell over the quiet harbour all night long.", "They met again in the old library.",
    "Numbers like 3.14 and 2.71 appear in the notes.", "A fox jumped over the lazy dog twice.",
]


@pytest.fixture(scope="session")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
    from sessa_data.tokenizer_train import train_tokenizer

    base = tmp_path_factory.mktemp("hftext")
    docs = base / "docs.jsonl"
    with open(docs, "w") as fh:
        for i in range(240):
            words = " ".join(SENTENCES[(i * 3 + j) % len(SENTENCES)] for j in range(4 + i % 5))
            fh.write(json.dumps({"text": f"{words} Story {i} ends here.", "source": "synthetic",
                                 "doc_id": f"d{i}"}) + "\n")
    train_tokenizer([str(docs)], 400, "bpe", str(base / "spm"), num_threads=1)
    tokenize_to_shards(TokenizeConfig(inputs=[str(docs)], tokenizer=str(base / "spm.model"),
                                      seq_len=64, out=str(base / "shards"), shard_bytes=1 << 20,
                                      workers=1, valid_fraction=0.2))
    return {"tokenizer": base / "spm.model", "train": base / "shards/train/manifest.json",
            "valid": base / "shards/valid/manifest.json", "base": base}


def write_checkpoint(run_dir: pathlib.Path, family: str, text: dict, step: int = 7,
                     extra: list[str] | None = None) -> DecoderLM:
    """A model-only checkpoint in the trainer's format (safetensors model files, config.yaml,
    manifest, COMPLETE) of a random-init model of ``family`` (a recipes/tiny recipe), with every
    parameter moved off its init (non-trivial Sessa gains and Mamba2 params)."""
    from sessa_pt.train.checkpoint import write_model_checkpoint

    overrides = [*FAMILIES[family], *(extra or []), "model.vocab_size=512",
                 f"data.train={text['train']}", f"data.valid={text['valid']}", "data.seq_len=64",
                 f"run.dir={run_dir}"]
    cfg = load_config(ROOT / "recipes" / "tiny" / f"{family}.yaml", overrides)
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    with torch.no_grad():       # move every parameter off its init so a mix-up shows
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    write_model_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}", model.state_dict(),
                           yaml.safe_dump(to_dict(cfg), sort_keys=False), {"step": step})
    return model.eval()


@pytest.fixture(scope="session")
def family_runs(text_run, tmp_path_factory) -> dict[str, tuple[pathlib.Path, DecoderLM]]:
    out = {}
    for family in FAMILIES:
        run_dir = tmp_path_factory.mktemp(f"run_{family}")
        out[family] = (run_dir, write_checkpoint(run_dir, family, text_run))
    return out


@pytest.fixture(scope="session")
def trained_text_run(text_run, tmp_path_factory) -> dict[str, str]:
    """A real 3-step single-process CPU training run of the tiny Sessa recipe (shrunk) on the
    text shards, with its mlflow run."""
    base = tmp_path_factory.mktemp("hftrained")
    run_dir, uri = base / "run", f"sqlite:///{base}/mlflow.db"
    summary = train_single_process(
        ["recipes/tiny/sessa.yaml", *FAMILIES["sessa"], "model.vocab_size=512",
         f"data.train={text_run['train']}", f"data.valid={text_run['valid']}",
         "data.seq_len=64", "data.num_workers=0", "train.steps=3", "train.micro_batch_size=4",
         "train.global_batch_size=4", "eval.max_batches=1", "checkpoint.every=0"], run_dir, uri)
    return {"run_dir": str(run_dir), "uri": uri, "run_id": summary["mlflow_run_id"]}
