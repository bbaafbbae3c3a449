"""Fixtures for the evaluation tests: SymbolSoup / diffuse-MQAR task shards, one real 2-step
training run (single process, CPU) whose checkpoint and mlflow run the CLIs read, a tokenizer
and text shards for perplexity and passkey, and checkpoints written in the trainer's format."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from sessa_pt.config import load_config, to_dict
from sessa_pt.models.lm import DecoderLM
from tests.single_process_run import train_single_process

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _data_cli(*args: str) -> None:
    from sessa_data.cli import main

    assert main(list(args)) == 0


@pytest.fixture(scope="session")
def symbolsoup(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("symbolsoup")
    _data_cli("symbolsoup", "--out", str(out), "--min-len", "60", "--max-len", "100",
              "--train", "40", "--valid", "16", "--test", "24")
    return out


@pytest.fixture(scope="session")
def mqar(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("mqar")
    _data_cli("mqar", "--out", str(out), "--variant", "diffuse", "--vocab-size", "64",
              "--seq-len", "64", "--num-pairs", "2", "--num-distractors", "2", "--lag-min",
              "12", "--lag-max", "30", "--train", "0", "--valid", "0", "--test", "16")
    return out


@pytest.fixture(scope="session")
def trained_run(symbolsoup: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, str]:
    """A real 2-step training run of the symbolsoup Sessa recipe (shrunk) on CPU."""
    base = tmp_path_factory.mktemp("trained")
    run_dir, uri = base / "run", f"sqlite:///{base}/mlflow.db"
    summary = train_single_process(
        ["recipes/symbolsoup/sessa.yaml", "model.d_model=32", "model.n_layers=2",
         "model.n_heads=2", "model.sessa.impl=chunked",
         f"data.train={symbolsoup}/train/manifest.json",
         f"data.valid={symbolsoup}/valid/manifest.json", "data.seq_len=100",
         "data.num_workers=0", "train.steps=2", "train.micro_batch_size=4",
         "train.global_batch_size=4", "eval.max_batches=2", "checkpoint.every=0"], run_dir, uri)
    return {"run_dir": str(run_dir), "uri": uri, "run_id": summary["mlflow_run_id"],
            "checkpoint": summary["checkpoint"], "data": str(symbolsoup)}


def write_checkpoint(run_dir: pathlib.Path, overrides: list[str], step: int = 5) -> DecoderLM:
    """A model-only checkpoint directory in the trainer's format (safetensors model files,
    config.yaml, trainer_state.json, MANIFEST.json, COMPLETE)."""
    from sessa_pt.train.checkpoint import write_model_checkpoint

    cfg = load_config(ROOT / "recipes" / "tiny" / "sessa.yaml",
                      [*overrides, f"run.dir={run_dir}"])
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    write_model_checkpoint(d, model.state_dict(), yaml.safe_dump(to_dict(cfg), sort_keys=False),
                           {"step": step})
    return model


PASSKEY_TEXT = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there. The grass "
                "is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
                "The pass key is {k}. Remember it. {k} is the pass key. What is the pass key? "
                "The pass key is {k}.")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A sentencepiece model and packed text shards from passkey-style documents."""
    from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
    from sessa_data.tokenizer_train import train_tokenizer

    base = tmp_path_factory.mktemp("text")
    docs = base / "docs.jsonl"
    with open(docs, "w") as fh:
        fh.writelines(json.dumps({"text": PASSKEY_TEXT.format(k=(i * 7919) % 50000 + 1),
                                 "source": "synthetic", "doc_id": f"d{i}"}) + "\n" for i in range(300))
    train_tokenizer([str(docs)], 320, "bpe", str(base / "spm"), num_threads=1)
    tokenize_to_shards(TokenizeConfig(inputs=[str(docs)], tokenizer=str(base / "spm.model"),
                                      seq_len=32, out=str(base / "shards"), shard_bytes=1 << 20,
                                      workers=1, valid_fraction=0.2))
    return {"tokenizer": base / "spm.model", "valid": base / "shards" / "valid" /
            "manifest.json"}
