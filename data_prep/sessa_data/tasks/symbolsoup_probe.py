"""How much of a SymbolSoup label the style blocks carry: a linear probe.

``python -m sessa_data.tasks.symbolsoup_probe [--train 6000 --test 1000 --min-len 400 --max-len 600]``

For each generated example, the letter (16) and bigram (256) frequencies of its two style blocks
(the letters between ``<sep1>`` and ``<sep2>``) are the features. The probe is told which
block carries the left style and which the right one (the generator's ``left_first``). It then
fits a multinomial logistic regression for the left style (4 classes) and the right style (5
classes), and prints the held-out accuracies. The result is a floor on what a model can learn
from the blocks. It says nothing about how hard that learning is: a model must also find the
blocks and tell their order.
"""

from __future__ import annotations

import argparse

import torch

from sessa_data.tasks import symbolsoup as ss

_SEP1, _SEP2 = ss.ID["<sep1>"], ss.ID["<sep2>"]
_LETTER = {ss.ID[c]: i for i, c in enumerate(ss.LETTERS)}


def block_features(tokens: list[int]) -> torch.Tensor:
    """(2, 16 + 256): unigram and bigram frequencies of the two style blocks, in order."""
    f = torch.zeros(2, 16 + 256)
    block, seen, prev = -1, 0, None
    for t in tokens:
        if t == _SEP1:
            block, seen, prev = seen, seen + 1, None
        elif t == _SEP2:
            block, prev = -1, None
        elif block >= 0 and t in _LETTER:
            c = _LETTER[t]
            f[block, c] += 1
            if prev is not None:
                f[block, 16 + 16 * prev + c] += 1
            prev = c
    return f / f[:, :16].sum(1, keepdim=True).clamp_min(1)


def dataset(n: int, split: str, seed: int, min_len: int, max_len: int):
    left, right, labels = [], [], []
    for i in range(n):
        label = ss.class_of(i, n, seed, split)
        ex = ss.make_example(i, label, seed, split, min_len, max_len)
        f = block_features(ex.tokens)
        first = ex.meta["left_first"]
        left.append(f[0 if first else 1])
        right.append(f[1 if first else 0])
        labels.append(label)
    return torch.stack(left), torch.stack(right), torch.tensor(labels)


def probe_accuracy(x_train, y_train, x_test, y_test, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    w = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        logits = ((x_train - mu) / sd) @ w + b
        loss = torch.nn.functional.cross_entropy(logits, y_train) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (((x_test - mu) / sd) @ w + b).argmax(1)
    return (pred == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(prog="python -m sessa_data.tasks.symbolsoup_probe",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lt, rt, yt = dataset(args.train, "train", args.seed, args.min_len, args.max_len)
    le, re_, ye = dataset(args.test, "test", args.seed, args.min_len, args.max_len)
    res = {"left_style_acc": probe_accuracy(lt, yt // 5, le, ye // 5, 4),
           "right_style_acc": probe_accuracy(rt, yt % 5, re_, ye % 5, 5)}
    print(f"linear probe, {args.min_len}-{args.max_len} tokens, {args.train} train / "
          f"{args.test} test examples: left style {res['left_style_acc']:.3f} (chance 0.25), "
          f"right style {res['right_style_acc']:.3f} (chance 0.20)")
    return res


if __name__ == "__main__":
    main()
