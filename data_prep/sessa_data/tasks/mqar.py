"""Multi-query associative recall (MQAR), in two variants.

``zoology`` (Arora et al., "Zoology", 2023; reimplemented from the paper's description): vocabulary V, keys
from ``[1, V/2)``, values from ``[V/2, V)``. The context ``k1 v1 ... kD vD`` is followed by a
query region of filler (0); query ``j`` puts ``k_j`` at offset ``2*g_j`` of that region and its
value right after it, with slots ``g`` drawn without replacement, ``p(g) ~ g^-0.99``. The values
in the query region are the targets.

``diffuse`` (the Sessa paper's harder variant): keys are ``key_len`` tokens and come in groups
that share their first ``key_len - 1`` tokens, so only the whole key identifies a value. Each
queried pair sits at an explicit lag before its query (``lag = query start - pair start``, drawn
uniformly from ``[lag_min, lag_max]``); the rest of the haystack is filler, and a distractor
block of unqueried pairs (sharing prefixes with the queried keys) sits right before the query
region. Test splits use longer lags than training. Token ranges: 0 pad, keys ``[1, V/2)``,
values ``[V/2, 7V/8)``, filler ``[7V/8, V)``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

from sessa_data.tasks.common import TaskExample, TaskVocab, example_rng


@dataclass(frozen=True)
class MQARConfig:
    variant: str = "zoology"  # or "diffuse"
    vocab_size: int = 8192
    seq_len: int = 256  # an example has seq_len + 1 tokens
    num_pairs: int = 16  # zoology: D context pairs; diffuse: queried pairs
    filler: str = "zero"  # zoology: "zero" or "random"
    key_len: int = 2  # diffuse
    value_len: int = 1  # diffuse
    prefix_group: int = 4  # diffuse: keys sharing one prefix
    num_distractors: int = 8  # diffuse: unqueried pairs in the distractor block
    lag_min: int = 64  # diffuse
    lag_max: int = 192  # diffuse

    def validate(self) -> None:
        if self.variant not in ("zoology", "diffuse"):
            raise ValueError(f"variant must be zoology or diffuse, got {self.variant!r}")
        if self.vocab_size < 64:
            raise ValueError("vocab_size must be at least 64")
        total = self.seq_len + 1
        if self.variant == "zoology":
            if 4 * self.num_pairs > total:
                raise ValueError(f"{self.num_pairs} pairs need seq_len >= {4 * self.num_pairs}")
            if self.filler not in ("zero", "random"):
                raise ValueError("filler must be zero or random")
            return
        stride = self.key_len + self.value_len
        if self.key_len < 2:
            raise ValueError("diffuse keys need key_len >= 2 (a shared prefix plus a suffix)")
        block = self.num_distractors * stride
        query_start = total - self.num_pairs * stride
        min_lag = self.num_pairs * stride + block
        if self.lag_min < min_lag or self.lag_max > query_start or self.lag_min > self.lag_max:
            raise ValueError(
                f"lags [{self.lag_min}, {self.lag_max}] impossible: need lag_min >= {min_lag} "
                f"(queries + distractor block) and lag_max <= {query_start} (seq_len + 1 minus "
                "the query region); raise seq_len or lower the lags"
            )

    def vocab(self) -> TaskVocab:
        ranges = ({"keys": [1, self.vocab_size // 2], "values": [self.vocab_size // 2,
                                                                   self.vocab_size]}
                  if self.variant == "zoology" else
                  {"keys": [1, self.vocab_size // 2],
                   "values": [self.vocab_size // 2, self.vocab_size * 7 // 8],
                   "filler": [self.vocab_size * 7 // 8, self.vocab_size]})
        return TaskVocab(f"mqar-{self.variant}", self.vocab_size, 0,
                         {"ranges": ranges, "pad": 0, "version": 1})


def _zoology(cfg: MQARConfig, rng: random.Random) -> TaskExample:
    v, d, total = cfg.vocab_size, cfg.num_pairs, cfg.seq_len + 1
    keys = rng.sample(range(1, v // 2), d)
    values = [rng.randrange(v // 2, v) for _ in range(d)]
    context = [tok for pair in zip(keys, values, strict=True) for tok in pair]
    slots = (total - 2 * d) // 2
    weights = [(g + 1) ** -0.99 for g in range(slots)]
    chosen: list[int] = []
    available = list(range(slots))
    for _ in range(d):  # weighted sampling without replacement
        pick = rng.choices(range(len(available)), weights=[weights[g] for g in available])[0]
        chosen.append(available.pop(pick))
    if cfg.filler == "zero":
        query = [0] * (total - 2 * d)
    else:
        query = [rng.randrange(1, v) for _ in range(total - 2 * d)]
    order = list(range(d))
    rng.shuffle(order)
    targets = []
    for j, g in zip(order, chosen, strict=True):
        query[2 * g], query[2 * g + 1] = keys[j], values[j]
        targets.append(2 * d + 2 * g + 1)
    return TaskExample(context + query, sorted(targets), {"num_pairs": d})


def _diffuse_keys(cfg: MQARConfig, count: int, rng: random.Random) -> list[list[int]]:
    half = cfg.vocab_size // 2
    keys: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(keys) < count:
        prefix = [rng.randrange(1, half) for _ in range(cfg.key_len - 1)]
        for _ in range(min(cfg.prefix_group, count - len(keys))):
            key = [*prefix, rng.randrange(1, half)]
            if tuple(key) not in seen:
                seen.add(tuple(key))
                keys.append(key)
    rng.shuffle(keys)
    return keys


def _diffuse(cfg: MQARConfig, rng: random.Random) -> TaskExample:
    v, q, total = cfg.vocab_size, cfg.num_pairs, cfg.seq_len + 1
    stride = cfg.key_len + cfg.value_len
    keys = _diffuse_keys(cfg, q + cfg.num_distractors, rng)
    values = [[rng.randrange(v // 2, v * 7 // 8) for _ in range(cfg.value_len)]
              for _ in keys]
    seq = [rng.randrange(v * 7 // 8, v) for _ in range(total)]
    query_start = total - q * stride
    block_start = query_start - cfg.num_distractors * stride
    for _attempt in range(1000):  # place sources at the drawn lags without overlaps
        lags = [rng.randint(cfg.lag_min, cfg.lag_max) for _ in range(q)]
        starts = [query_start + j * stride - lag for j, lag in enumerate(lags)]
        spans = sorted(starts)
        if (all(b - a >= stride for a, b in itertools.pairwise(spans))
                and spans[0] >= 0 and spans[-1] + stride <= block_start):
            break
    else:
        raise ValueError("could not place the pairs at the requested lags; widen the lag range")
    targets: list[int] = []
    for j in range(q):
        pair = keys[j] + values[j]
        seq[starts[j]:starts[j] + stride] = pair
        at = query_start + j * stride
        seq[at:at + stride] = pair
        targets.extend(range(at + cfg.key_len, at + stride))
    for i in range(cfg.num_distractors):
        at = block_start + i * stride
        seq[at:at + stride] = keys[q + i] + values[q + i]
    return TaskExample(seq, targets, {"lags": lags, "sources": starts, "num_pairs": q})


def make_example(cfg: MQARConfig, index: int, seed: int, split: str) -> TaskExample:
    rng = example_rng(f"mqar-{cfg.variant}", seed, split, index)
    return _zoology(cfg, rng) if cfg.variant == "zoology" else _diffuse(cfg, rng)


def params(cfg: MQARConfig) -> dict[str, object]:
    return asdict(cfg)
