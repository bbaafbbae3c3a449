"""Summarise training runs as a throughput table: tokens/s and MFU (median over the steps after
warm-up), peak memory, parameters. ``python -m sessa_pt.train.bench RUN_DIR [RUN_DIR ...]``.

Used for the GPU training benchmark in BENCHMARKS.md; MFU counts 3x the model's forward
``flops_per_token`` (no activation recomputation) against the accelerator's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import yaml


def summarise(run_dir: pathlib.Path, skip: int) -> dict:
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steady = log[skip:] or log
    p = cfg["parallel"]
    return {"run": cfg["run"]["name"] or run_dir.name,
            "mixer/block": f"{cfg['model']['mixer']}/{cfg['model']['block']}",
            "layout": f"tp{p['tp']} pp{p['pp']} z{p['zero_stage']}",
            "T": cfg["data"]["seq_len"],
            "tokens/s": statistics.median(r["tokens_per_s"] for r in steady),
            "MFU %": 100 * statistics.median(r["mfu"] for r in steady),
            "mem GB": max(r["memory_gb"] for r in log),
            "final loss": log[-1]["loss"], "steps": len(log)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=pathlib.Path)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    ap.add_argument("--speedup-vs", metavar="SUFFIX", default=None,
                    help="add a column: tokens/s over the run whose name is this one's with its "
                         "last '_' part replaced by SUFFIX (e.g. _dp1: sessa_dp2 vs sessa_dp1)")
    args = ap.parse_args(argv)
    logged = [r for r in args.runs if (r / "train_log.jsonl").is_file()]
    for r in sorted(set(args.runs) - set(logged)):
        print(f"(no steps logged by {r}: left out)", file=sys.stderr)
    if not logged:
        print("no run logged a step", file=sys.stderr)
        return 1
    rows = [summarise(r, args.skip) for r in logged]
    if args.speedup_vs:
        tps = {r["run"]: r["tokens/s"] for r in rows}
        for r in rows:
            base = tps.get(r["run"].rsplit("_", 1)[0] + args.speedup_vs)
            r["speedup"] = f"{r['tokens/s'] / base:.2f}x" if base else "-"
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:,.0f}" if k == "tokens/s" else f"{v:.1f}" if isinstance(v, float) else
                 str(v) for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
