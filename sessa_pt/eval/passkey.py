"""Passkey retrieval (Mohtashami & Jaggi) by greedy generation, as a depth x length table.

The prompt is the generator's text (``sessa_data.tasks.passkey``): an intro, filler sentences
repeated to fill ``length`` tokens with the passkey sentence inserted after ``round(depth *
repeats)`` of them, and the question "... The pass key is". The model continues greedily with
:meth:`DecoderLM.generate` (recurrent caches); the answer is correct when the first integer in
the decoded continuation equals the key (exact match). Keys are drawn per (length, depth,
sample) from a seeded generator, uniform in 1..50000.
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch

from sessa_pt.eval.common import Loaded, autocast

INT_RE = re.compile(r"\d+")


def build_prompt(sp, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens (the answer not included)."""
    from sessa_data.tasks.passkey import FILLER, INTRO, NEEDLE, QUESTION

    intro, filler = sp.encode(INTRO), sp.encode(FILLER)
    needle, question = sp.encode(NEEDLE.format(key=key)), sp.encode(QUESTION)
    prefix = [sp.bos_id()] if sp.bos_id() >= 0 else []
    fixed = len(prefix) + len(intro) + len(needle) + len(question)
    repeats = (length - fixed) // len(filler)
    if repeats < 1:
        raise SystemExit(f"--lengths {length} is too short for a passkey prompt (needs at least "
                         f"{fixed + len(filler)} tokens with this tokenizer)")
    at = round(depth * repeats)
    return prefix + intro + filler * at + needle + filler * (repeats - at) + question


@torch.no_grad()
def passkey_table(loaded: Loaded, tokenizer: str, lengths: list[int], depths: list[float],
                  samples: int = 5, seed: int = 0, bf16: bool = True) -> dict[str, Any]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    if sp.get_piece_size() > loaded.cfg.model.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer} has {sp.get_piece_size()} pieces but the model's "
                         f"vocabulary is {loaded.cfg.model.vocab_size}")
    rng = random.Random(seed)
    model, dev = loaded.model, loaded.device
    cells: list[dict[str, Any]] = []
    for length in lengths:
        for depth in depths:
            keys = [rng.randint(1, 50000) for _ in range(samples)]
            prompts = [build_prompt(sp, length, depth, k) for k in keys]
            max_new = max(len(sp.encode(f" {k}")) for k in keys) + 2
            correct, outputs = 0, []
            for key, prompt in zip(keys, prompts, strict=True):
                x = torch.tensor([prompt], dtype=torch.long, device=dev)
                with autocast(dev, bf16):
                    out = model.generate(x, max_new)
                text = sp.decode(out[0].tolist())
                found = INT_RE.search(text)
                ok = found is not None and int(found.group()) == key
                correct += int(ok)
                outputs.append({"key": key, "generated": text, "correct": ok,
                                "prompt_tokens": len(prompt)})
            cells.append({"length": length, "depth": depth, "samples": samples,
                          "acc": correct / samples, "outputs": outputs})
    return {"tokenizer": tokenizer, "lengths": lengths, "depths": depths, "seed": seed,
            "cells": cells, "acc": sum(c["acc"] for c in cells) / len(cells)}


def format_passkey(result: dict[str, Any]) -> str:
    lengths, depths = result["lengths"], result["depths"]
    acc = {(c["length"], c["depth"]): c["acc"] for c in result["cells"]}
    corner = "depth \\ length"
    head = f"{corner:>14}" + "".join(f"{n:>9}" for n in lengths)
    rows = [head]
    for d in depths:
        rows.append(f"{d:>14.2f}" + "".join(f"{acc[(n, d)]:>9.2f}" for n in lengths))
    rows.append(f"{'mean':>14}" + "".join(
        f"{sum(acc[(n, d)] for d in depths) / len(depths):>9.2f}" for n in lengths))
    return "\n".join(rows)
