"""Fixtures for the distributed tests: small real LM shards (Austen, vocab 512, seq_len 32),
a tiny recipe, torchrun launches, and a plain single-process PyTorch reference trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sessa_data.fetch import fetch
from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
from sessa_data.tokenizer_train import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32


@pytest.fixture(scope="session")
def lm_data(request: pytest.FixtureRequest, tmp_path_factory) -> dict:
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("sessa_data_austen")) if cache else tmp_path_factory.mktemp("au")
    fetch(["austen"], root / "corpus", root / "packages")
    work = tmp_path_factory.mktemp("dist_data")
    corpus = work / "two_novels.jsonl"
    with open(root / "corpus" / "austen.jsonl") as src, open(corpus, "w") as dst:
        for line in src:
            doc = json.loads(line)
            if doc["doc_id"] in ("austen/persuasion", "austen/northangerabbey"):
                doc["source"] = doc["doc_id"].split("/")[1]   # hold out one novel whole
                dst.write(json.dumps(doc) + "\n")
    prefix = work / "bpe512"
    train_tokenizer([str(corpus)], 512, "bpe", str(prefix))
    tokenize_to_shards(TokenizeConfig(inputs=[str(corpus)], tokenizer=f"{prefix}.model",
                                      seq_len=SEQ_LEN, out=str(work / "shards"),
                                      shard_bytes=200_000, workers=1, valid_fraction=0.0,
                                      valid_sources=["persuasion"]))
    return {"train": str(work / "shards" / "train" / "manifest.json"),
            "valid": str(work / "shards" / "valid" / "manifest.json")}


def tiny_overrides(data: dict, mixer: str = "sessa", **extra) -> list[str]:
    base = {"model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 4,
            "model.n_heads": 4, "model.mixer": mixer, "data.train": data["train"],
            "data.valid": data["valid"], "data.seq_len": SEQ_LEN, "data.num_workers": 0,
            "train.steps": 3, "train.micro_batch_size": 4, "train.global_batch_size": 16,
            "train.precision": "fp32", "train.log_every": 1, "optim.lr": 3e-3,
            "optim.warmup_steps": 2, "optim.grad_clip": 1.0, "eval.every": 0,
            "eval.max_batches": 2, "checkpoint.every": 0, "tracking.enabled": False,
            "run.seed": 7}
    if mixer == "mamba2":    # 4 heads in 2 B/C groups, so TP=2 can split both
        base.update({"model.mamba2.head_dim": 16, "model.mamba2.n_groups": 2,
                     "model.mamba2.d_state": 16, "model.mamba2.chunk_size": 16})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def torchrun(nproc: int, args: list[str], env: dict | None = None, check: bool = True,
             timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
                    **(env or {}))
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def reference_run(overrides: list[str], steps: int, model_out: dict | None = None
                  ) -> list[dict]:
    """The same model, data order, optimizer, schedule and clipping in plain single-process
    PyTorch (no DeepSpeed, no megatron): per-step loss and pre-clip grad norm."""
    from sessa_pt.config import load_config
    from sessa_pt.data import TokenShardDataset, build_train_loader
    from sessa_pt.models.lm import DecoderLM
    from sessa_pt.parallel.engine import lr_lambda, param_groups

    cfg = load_config(None, overrides)
    o = cfg.optim
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds = TokenShardDataset(cfg.data.train, expected_seq_len=cfg.data.seq_len)
    G = cfg.train.global_batch_size
    batches = iter(build_train_loader(ds, seed=cfg.run.seed, global_batch_size=G,
                                      micro_batch_size=G))
    out = []
    for step in range(1, steps + 1):
        b = next(batches)
        loss = model(b["input_ids"], labels=b["labels"], loss_mask=b["loss_mask"])
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append({"step": step, "loss": loss.item(), "grad_norm": gnorm.item(),
                    "sample_id_sum": int(b["sample_ids"].sum())})
    if model_out is not None:
        model_out.update(model.state_dict())
    return out
