"""SymbolSoup (Sessa paper, arXiv 2604.18580): classify a sequence by the styles of two hidden
blocks of letters buried in uniform noise. Reimplemented from the paper's description,
following the authors' generator (``LibratioAI/sessa``,
``datasets/SymbolSoup.py``) in every sampling rule: secondary letters prefer only themselves as
the next letter, motifs are inserted only where one fits whole, flips change the letter, and the
block lengths are drawn as theirs are. The random streams are ours (one seeded stream per
example), so the examples are not theirs byte for byte.

Vocabulary (character level, one token per character or special): ``<pad> <bos> <sep1> <sep2>
<sep> <label>``, space, newline, the letters ``a``-``p``, and 20 class tokens ``<c0>..<c19>``.
Layout (parts joined by newlines, letters and the final two specials by spaces)::

    <bos> N0 <sep1> B1 <sep2> N1 <sep1> B2 <sep2> N2 <sep> <label> <cK>

``2M + 13`` tokens up to ``<label>`` for ``M`` letters, then the class token, the only target.
Class ``k`` = (left style ``k // 5``, right style ``k % 5``); B1/B2 are the left and right style
blocks in random order. Classes are balanced within each split (counts differ by at most 1).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from sessa_data.tasks.common import TaskExample, TaskVocab, example_rng

LETTERS = [chr(ord("a") + i) for i in range(16)]
SPECIALS = ["<pad>", "<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", " ", "\n"]
NUM_CLASSES = 20
CLASS_TOKENS = [f"<c{k}>" for k in range(NUM_CLASSES)]
TOKENS = SPECIALS + LETTERS + CLASS_TOKENS
ID = {tok: i for i, tok in enumerate(TOKENS)}
VOCAB = TaskVocab("symbolsoup", len(TOKENS), ID["<pad>"], {"tokens": TOKENS, "version": 1})
MOTIF_P, FLIP_P, BIGRAM_BOOST = 0.3, 0.03, 4.0


@dataclass(frozen=True)
class Style:
    weights: dict[str, float]
    preferred: frozenset[tuple[str, str]]


def _make_style(rng: random.Random) -> Style:
    letters = LETTERS[:]
    rng.shuffle(letters)
    prim, sec = letters[:4], letters[4:8]
    weights = {c: 1.0 for c in LETTERS}
    weights.update({c: 3.0 for c in prim})
    weights.update({c: 2.0 for c in sec})
    pref = {(prim[i], prim[(i + 1) % 4]) for i in range(4)}
    pref |= {(p, p) for p in prim}
    pref |= {(c, c) for c in sec}
    pref |= {(prim[i], sec[i]) for i in range(4)} | {(sec[i], prim[i]) for i in range(4)}
    return Style(weights, frozenset(pref))


@lru_cache(maxsize=1)
def styles() -> tuple[list[Style], list[Style]]:
    """The 4 left styles (seed 123) and 5 right styles (seed 456)."""
    left_rng, right_rng = random.Random(123), random.Random(456)
    return [_make_style(left_rng) for _ in range(4)], [_make_style(right_rng) for _ in range(5)]


def _motifs(style: Style) -> tuple[list[list[str]], list[float]]:
    runs, weights = [], []
    for length in (3, 4, 5):
        for start in range(16 - length + 1):
            run = LETTERS[start:start + length]
            n_prim = sum(style.weights[c] == 3.0 for c in run)
            n_sec = sum(style.weights[c] == 2.0 for c in run)
            runs.append(run)
            weights.append(1.0 + 0.9 * n_prim + 0.5 * n_sec)
    return runs, weights


def style_block(style: Style, length: int, rng: random.Random) -> list[str]:
    """``length`` letters in a style: motifs (only where one fits whole) and biased Markov
    steps, then each letter flipped to a different letter with probability 3%."""
    runs, motif_weights = _motifs(style)
    out: list[str] = []
    while len(out) < length:
        room = length - len(out)
        if room >= 3 and rng.random() < MOTIF_P:
            fits = [i for i, run in enumerate(runs) if len(run) <= room]
            pick = rng.choices(fits, weights=[motif_weights[i] for i in fits])[0]
            out.extend(runs[pick])
            continue
        prev = out[-1] if out else None
        weights = [style.weights[c] * (BIGRAM_BOOST if (prev, c) in style.preferred else 1.0)
                   for c in LETTERS]
        out.append(rng.choices(LETTERS, weights=weights)[0])
    return [rng.choice([x for x in LETTERS if x != c]) if rng.random() < FLIP_P else c
            for c in out]


def letter_bounds(min_len: int, max_len: int) -> tuple[int, int]:
    """Range of the letter count M so that 2M + 13 lies in [min_len, max_len]."""
    lo, hi = math.ceil((min_len - 13) / 2), (max_len - 13) // 2
    if lo < 10 or hi < lo:
        raise ValueError(f"length range [{min_len}, {max_len}] is too short for SymbolSoup")
    return lo, hi


def class_of(index: int, num_examples: int, seed: int, split: str) -> int:
    """Balanced classes: a seeded shuffle of ``i % 20`` over the split."""
    return _class_order(num_examples, seed, split)[index]


@lru_cache(maxsize=8)
def _class_order(num_examples: int, seed: int, split: str) -> tuple[int, ...]:
    # Cached: building and shuffling the split's order per example made generation quadratic.
    order = [i % NUM_CLASSES for i in range(num_examples)]
    example_rng("symbolsoup-classes", seed, split, 0).shuffle(order)
    return tuple(order)


def make_example(index: int, label: int, seed: int, split: str, min_len: int,
                 max_len: int) -> TaskExample:
    rng = example_rng("symbolsoup", seed, split, index)
    lo, hi = letter_bounds(min_len, max_len)
    letters = rng.randint(lo, hi)
    # Lengths as the authors' generator draws them: noise ~ U[0.3M, 0.6M] letters, cut into
    # three blocks by two sequential draws; the rest cut in two for the style blocks. (Their
    # clamps, noise >= 3 and <= M - 2, never act: letter_bounds keeps M >= 10.)
    noise = rng.randint(int(0.3 * letters), int(0.6 * letters))
    n0 = rng.randint(1, noise - 2)
    n1 = rng.randint(1, noise - n0 - 1)
    n2 = noise - n0 - n1
    left_len = rng.randint(1, letters - noise - 1)
    right_len = letters - noise - left_len
    left_styles, right_styles = styles()
    blocks = [style_block(left_styles[label // 5], left_len, rng),
              style_block(right_styles[label % 5], right_len, rng)]
    left_first = rng.random() < 0.5
    if not left_first:
        blocks.reverse()
    noise_blocks = [[rng.choice(LETTERS) for _ in range(n)] for n in (n0, n1, n2)]
    parts: list[list[str]] = [
        ["<bos>"], noise_blocks[0], ["<sep1>"], blocks[0], ["<sep2>"], noise_blocks[1],
        ["<sep1>"], blocks[1], ["<sep2>"], noise_blocks[2], ["<sep>", "<label>"]]
    tokens: list[str] = []
    for i, part in enumerate(parts):
        if i:
            tokens.append("\n")
        for j, tok in enumerate(part):
            if j:
                tokens.append(" ")
            tokens.append(tok)
    assert len(tokens) == 2 * letters + 13
    ids = [ID[t] for t in tokens] + [ID[CLASS_TOKENS[label]]]
    return TaskExample(ids, [len(ids) - 1],
                       {"label": label, "letters": letters, "noise": noise,
                        "left_first": left_first, "length": len(tokens)})


def decode(ids: list[int]) -> str:
    return "".join(TOKENS[i] for i in ids)
