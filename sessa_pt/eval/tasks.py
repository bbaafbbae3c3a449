"""Perplexity on packed text shards and accuracy on task shards (SymbolSoup, MQAR).

Both read a split through :class:`sessa_pt.data.TokenShardDataset` in manifest order. Task
shards carry a loss mask that is 1 exactly at the answer positions; accuracy is the greedy
(argmax over the whole vocabulary) prediction compared with the label there. For SymbolSoup that
is the class token (one per example; token accuracy = example accuracy); for MQAR it is every
value token (the paper's "token accuracy"), and an example counts as solved when all its value
tokens are right.

Breakdowns come from each example's metadata: SymbolSoup by sequence length (``length``),
diffuse MQAR by source-query lag (``lags``: one per queried pair, whose ``value_len`` value
tokens follow in order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sessa_pt.eval.common import Loaded, autocast
from sessa_pt.models.lm import masked_loss_sum, mean_loss


def _check_vocab(loaded: Loaded, ds) -> None:
    if ds.vocab_size > loaded.cfg.model.vocab_size:
        raise SystemExit(f"the shards' vocabulary ({ds.vocab_size}) is larger than the model's "
                         f"({loaded.cfg.model.vocab_size}): wrong --data for this checkpoint?")


@torch.no_grad()
def perplexity(loaded: Loaded, manifest: str, batch_size: int = 8,
               max_samples: int | None = None, bf16: bool = True) -> dict[str, Any]:
    """Mean next-token cross entropy over the split's loss-mask positions, its exp, and top-1 /
    top-5 next-token accuracy."""
    from sessa_pt.data import TokenShardDataset, build_eval_loader

    ds = TokenShardDataset(manifest)
    _check_vocab(loaded, ds)
    loader = build_eval_loader(ds, batch_size, max_samples=max_samples)
    model, dev = loaded.model, loaded.device
    nll = top1 = top5 = n = 0.0
    samples = 0
    for batch in loader:
        x, y = batch["input_ids"].to(dev), batch["labels"].to(dev)
        m = batch["loss_mask"].to(dev)
        with autocast(dev, bf16):
            logits = model(x)
        logits = logits.float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        batch_nll, batch_tokens = masked_loss_sum(ce, m)
        nll += float(batch_nll)
        top = logits.topk(5, dim=-1).indices
        top1 += float(((top[..., 0] == y).float() * m).sum())
        top5 += float(((top == y[..., None]).any(-1).float() * m).sum())
        n += float(batch_tokens)
        samples += int((batch["sample_ids"] >= 0).sum())
    loss = float(mean_loss(torch.tensor(nll, dtype=torch.float64),
                           torch.tensor(n, dtype=torch.float64)))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "top1": top1 / max(n, 1.0),
            "top5": top5 / max(n, 1.0), "tokens": int(n), "samples": samples,
            "seq_len": ds.seq_len, "manifest": str(manifest)}


@dataclass
class TaskResult:
    task: str
    split: str
    token_acc: float
    example_acc: float
    targets: int
    examples: int
    breakdown_key: str | None                      # "length" | "lag" | None
    bins: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "token_acc": self.token_acc,
                "example_acc": self.example_acc, "targets": self.targets,
                "examples": self.examples, "breakdown": self.breakdown_key, "bins": self.bins}


def _bin_edges(values: np.ndarray, n_bins: int, log: bool) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.array([lo, lo + 1.0])
    if log and lo > 0:
        return np.geomspace(lo, hi + 1e-9, n_bins + 1)
    return np.linspace(lo, hi + 1e-9, n_bins + 1)


def _breakdown(xs: np.ndarray, correct: np.ndarray, n_bins: int, log: bool) -> list[dict]:
    edges = _bin_edges(xs, n_bins, log)
    out = []
    idx = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, len(edges) - 2)
    for b in range(len(edges) - 1):
        sel = idx == b
        if not sel.any():
            continue
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]),
                    "center": float(xs[sel].mean()), "n": int(sel.sum()),
                    "acc": float(correct[sel].mean())})
    return out


@torch.no_grad()
def task_accuracy(loaded: Loaded, manifest: str, batch_size: int = 16,
                  max_samples: int | None = None, n_bins: int = 5,
                  bf16: bool = True) -> TaskResult:
    from sessa_pt.data import TokenShardDataset

    ds = TokenShardDataset(manifest)
    _check_vocab(loaded, ds)
    if not ds.has_mask:
        raise SystemExit(f"{manifest} has no loss mask: `task` needs task shards (sessa-data "
                         "symbolsoup|mqar); use `ppl` for text")
    task = str(ds.manifest.generator.get("task") or ds.manifest.tokenizer.get("task_vocab")
               or "task")
    total = ds.num_samples if max_samples is None else min(max_samples, ds.num_samples)
    model, dev = loaded.model, loaded.device
    per_target_x: list[float] = []    # breakdown value of every target token
    per_target_ok: list[bool] = []
    example_ok: list[bool] = []
    key: str | None = None
    for start in range(0, total, batch_size):
        idx = list(range(start, min(start + batch_size, total)))
        tokens = np.stack([ds.tokens_numpy(i) for i in idx]).astype(np.int64)
        masks = np.stack([ds.mask_numpy(i) for i in idx]).astype(bool)
        last = int(np.nonzero(masks.any(0))[0].max()) + 1 if masks.any() else 1
        x = torch.from_numpy(tokens[:, :last]).to(dev)
        with autocast(dev, bf16):
            logits = model(x)
        pred = logits.argmax(-1).cpu().numpy()
        labels = tokens[:, 1:last + 1]
        for r, i in enumerate(idx):
            pos = np.nonzero(masks[r, :last])[0]
            ok = pred[r, pos] == labels[r, pos]
            example_ok.append(bool(ok.all()))
            meta = ds.meta(i) or {}
            xs, key = _target_values(meta, len(pos), key)
            per_target_ok.extend(ok.tolist())
            per_target_x.extend(xs)
    ok_arr = np.array(per_target_ok, dtype=np.float64)
    bins: list[dict[str, Any]] = []
    if key is not None and per_target_x and not any(math.isnan(v) for v in per_target_x):
        bins = _breakdown(np.array(per_target_x, dtype=np.float64), ok_arr, n_bins,
                          log=key == "lag")
    return TaskResult(task=task, split=ds.manifest.split, token_acc=float(ok_arr.mean()),
                      example_acc=float(np.mean(example_ok)), targets=len(ok_arr),
                      examples=len(example_ok), breakdown_key=key, bins=bins)


def _target_values(meta: dict[str, Any], n_targets: int,
                   key: str | None) -> tuple[list[float], str | None]:
    """The breakdown value of each target of one example, from its metadata."""
    if meta.get("lags"):
        lags = list(meta["lags"])
        per = max(1, n_targets // len(lags))
        return [float(lags[min(t // per, len(lags) - 1)]) for t in range(n_targets)], "lag"
    if "length" in meta:
        return [float(meta["length"])] * n_targets, "length"
    return [math.nan] * n_targets, key
