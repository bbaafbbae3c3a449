"""Passkey retrieval (Mohtashami & Jaggi) tokenized with a sentencepiece model.

The prompt is an intro, repeated filler sentences with the passkey sentence at a random depth,
and the question; the answer is the passkey's tokens followed by eos, and those are the targets.
Pieces are tokenized separately and concatenated, so the answer span is known exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import sentencepiece as spm

from sessa_data.tasks.common import TaskExample, example_rng

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyConfig:
    seq_len: int = 1024
    min_key: int = 1
    max_key: int = 50000
    min_depth: float = 0.0
    max_depth: float = 1.0


@lru_cache(maxsize=2)
def _processor(model_path: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=model_path)


def make_example(cfg: PasskeyConfig, model_path: str, index: int, seed: int,
                 split: str) -> TaskExample:
    sp = _processor(model_path)
    rng = example_rng("passkey", seed, split, index)
    key = rng.randint(cfg.min_key, cfg.max_key)
    intro, filler = sp.encode(INTRO), sp.encode(FILLER)
    needle, question = sp.encode(NEEDLE.format(key=key)), sp.encode(QUESTION)
    answer = sp.encode(f" {key}") + [sp.eos_id()]
    prefix = [sp.bos_id()] if sp.bos_id() >= 0 else []
    fixed = len(prefix) + len(intro) + len(needle) + len(question) + len(answer)
    repeats = (cfg.seq_len + 1 - fixed) // len(filler)
    if repeats < 1:
        raise ValueError(f"seq_len {cfg.seq_len} is too short for a passkey prompt")
    depth = rng.uniform(cfg.min_depth, cfg.max_depth)
    at = round(depth * repeats)
    tokens = prefix + intro + filler * at + needle + filler * (repeats - at) + question
    start = len(tokens)
    tokens += answer
    return TaskExample(tokens, list(range(start, len(tokens))),
                       {"passkey": key, "depth": depth, "filler_repeats": repeats,
                        "answer_start": start})


def params(cfg: PasskeyConfig) -> dict[str, object]:
    return asdict(cfg)
