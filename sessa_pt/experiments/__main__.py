"""``python -m sessa_pt.experiments EXPERIMENT {sweep,seeds,all} [options]``: the tuned
comparisons (symbolsoup, symbolsoup2048, mqar, lm); ``--help`` after the experiment lists the
options."""

from __future__ import annotations

import sys

from sessa_pt.experiments import tuned
from sessa_pt.experiments.lm import LanguageModel
from sessa_pt.experiments.mqar import DiffuseMQAR
from sessa_pt.experiments.symbolsoup import SymbolSoup

EXPERIMENTS = {"symbolsoup": lambda: SymbolSoup("symbolsoup"),
               "symbolsoup2048": lambda: SymbolSoup("symbolsoup2048"),
               "mqar": DiffuseMQAR, "lm": LanguageModel}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        print(f"usage: python -m sessa_pt.experiments {{{','.join(EXPERIMENTS)}}} "
              "{sweep,seeds,all} [options]; add --help after the experiment for the options",
              file=sys.stderr)
        return 2
    return tuned.main(EXPERIMENTS[argv[0]](), argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
