"""Command line of the trainer: ``torchrun --nproc_per_node N -m sessa_pt.train RECIPE
[key=value ...]`` (also the ``sessa-train`` console script)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sessa-train",
        description="Train a Sessa / Transformer / Mamba2 LM from a YAML recipe under torchrun "
                    "(e.g. torchrun --nproc_per_node 2 -m sessa_pt.train recipes/tiny/sessa.yaml "
                    "parallel.tp=2). Overrides are dotted keys: train.steps=10 run.dir=runs/x.")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.pp=2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    from sessa_pt.train.trainer import main as train_main

    code = train_main(args.recipe, args.overrides, imports_s=time.perf_counter() - t0)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown of process groups: DeepSpeed/gloo occasionally abort in
    # destroy_process_group after a finished run.
    os._exit(code)


if __name__ == "__main__":
    main()
