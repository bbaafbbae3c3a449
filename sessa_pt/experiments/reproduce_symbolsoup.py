"""SymbolSoup reproduction (the paper's Table 1, first column) on one or more GPUs:
``python -m sessa_pt.experiments.reproduce_symbolsoup [--length 600|2048] [--out DIR]
[--gpus 0,1,2 --runs-per-gpu 2] [key=value overrides]``.

Steps, each printed and recorded with its exact command:

1. generate the task shards (``sessa-data symbolsoup``, seed 0: steps x global batch fresh
   training examples, so each is seen once, and 2000/2000 valid/test) unless they exist;
2. train Sessa, Transformer and Mamba2 (``recipes/symbolsoup[2048]/{sessa,transformer,
   mamba2}.yaml``: the paper's gated block, non-embedding parameters matched within 2%) for each
   seed (default 1 and 2), one process each, all logging to one mlflow store in ``--out``;
   ``--max-minutes-per-run`` stops a run that overruns (the trainer saves at the next step and
   the results say so);
3. evaluate accuracy on the held-out test split at the label position
   (``python -m sessa_pt.eval.cli task``), logged into each training run;
4. write ``RESULTS.md`` (our accuracies, mean ± std over seeds, beside the paper's Table 1, with
   the per-length breakdown, run times and every command) and the comparison report
   (``python -m sessa_pt.eval.report``).

``--setting NAME:OVERRIDES`` (repeatable) turns it into a sweep: every variant and seed is
trained once per setting (runs under ``<out>/runs/NAME/``, mlflow run name
``<family>-<variant>-NAME``), all runs sharing the ``--gpus`` slots, and RESULTS.md gets a row
per setting and model. E.g. a learning-rate sweep:
``--setting 'lr5e-4:optim.lr=5e-4 optim.min_lr=5e-5' --setting 'lr2e-3:optim.lr=2e-3
optim.min_lr=2e-4'``.

Budget: the recipes' (600 tokens: 3000 steps x 128 sequences, AdamW lr 5e-4). On H200s the six
runs took 4.8-7.2 minutes each, two per GPU (RESULTS.md). ``--smoke`` runs the whole pipeline
on CPU in about a minute (tiny shards of 64-100 tokens, 2 steps per run, chunked Sessa
feedback) to check it end to end. ``--dry-run`` prints the commands only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import pathlib
import statistics
import sys
from typing import Any

from sessa_pt.experiments.runner import (
    ROOT,
    Job,
    Runner,
    ensure_experiment,
    environment,
    gpu_slots,
    read_json,
    tracking_uri,
)
from sessa_pt.train.tracking import mlflow_env

PAPER = {"sessa": (0.8601, 0.0016), "transformer": (0.7921, 0.0070),
         "mamba2": (0.0500, 0.0000)}
VARIANTS = ("sessa", "transformer", "mamba2")
LABEL = {"sessa": "Sessa", "transformer": "Transformer", "mamba2": "Mamba2"}
LENGTHS = {600: (400, 600), 2048: (1366, 2048)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sessa_pt.experiments.reproduce_symbolsoup",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--length", type=int, choices=sorted(LENGTHS), default=600,
                   help="600: the paper's 400-600-token task; 2048: 1366-2048 tokens")
    p.add_argument("--out", help="output directory (default runs/reproduce_symbolsoup<length>, "
                                 "or ..._smoke with --smoke)")
    p.add_argument("--data", help="shard directory (default data/symbolsoup or "
                                  "data/symbolsoup2048; <out>/data with --smoke)")
    p.add_argument("--seeds", default="1,2", help="comma-separated run.seed values")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variants of the recipe family")
    p.add_argument("--steps", type=int, help="override train.steps (default: the recipe's)")
    p.add_argument("--impl", choices=["triton", "chunked", "dense"],
                   help="Sessa feedback implementation (default: the recipe's triton on GPU, "
                        "chunked with --smoke)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun when > 1)")
    p.add_argument("--gpus", default="",
                   help="comma-separated GPU ids: train (and evaluate) the runs concurrently, "
                        "each pinned to one of them by CUDA_VISIBLE_DEVICES (logs in <out>/logs)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="concurrent runs per GPU with --gpus (small models leave an H200 idle)")
    p.add_argument("--max-minutes-per-run", type=float, default=0.0,
                   help="stop a run after this many minutes (0 = never)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the whole pipeline: tiny shards, 2 steps per run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--results", help="RESULTS.md path (default <out>/RESULTS.md)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME:OVERRIDES",
                   help="a sweep: train every variant and seed once per setting, with the "
                        "setting's space-separated key=value overrides (repeatable), e.g. "
                        "--setting 'lr5e-4:optim.lr=5e-4 optim.min_lr=5e-5' --setting "
                        "'lr2e-3:optim.lr=2e-3'; all runs share the slots of --gpus")
    p.add_argument("extra", nargs="*", help="extra key=value training overrides (every run)")
    return p


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of a sweep: a name (run directories, mlflow run names, tables) and the
    training overrides that define it. The unnamed setting is the plain reproduction."""
    name: str
    overrides: tuple[str, ...] = ()


def parse_settings(specs: list[str]) -> list[Setting]:
    """``NAME:key=value key=value`` specs; no spec gives the one unnamed setting."""
    if not specs:
        return [Setting("")]
    out: list[Setting] = []
    for spec in specs:
        name, sep, rest = spec.partition(":")
        name, overrides = name.strip(), tuple(rest.split())
        if not sep or not name or not all(c.isalnum() or c in "._-" for c in name):
            raise SystemExit(f"--setting {spec!r}: write NAME:key=value ..., with a NAME of "
                             "letters, digits, '.', '_' or '-'")
        if bad := [o for o in overrides if "=" not in o]:
            raise SystemExit(f"--setting {spec!r}: {bad[0]!r} is not a key=value override")
        if name in {x.name for x in out}:
            raise SystemExit(f"--setting {name!r} is given twice: names must differ")
        out.append(Setting(name, overrides))
    return out


def train_examples(family: str, steps: int | None) -> int:
    """train.steps x train.global_batch_size of the family's recipes (they share both)."""
    from sessa_pt.config import load_config

    t = load_config(ROOT / "recipes" / family / "sessa.yaml").train
    return (steps or t.steps) * t.global_batch_size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    family = "symbolsoup" if args.length == 600 else "symbolsoup2048"
    suffix = "_smoke" if args.smoke else ""
    out = pathlib.Path(args.out or f"runs/reproduce_{family}{suffix}").resolve()
    data = pathlib.Path(args.data or (out / "data" if args.smoke else f"data/{family}"))
    data = data if data.is_absolute() else (ROOT / data)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v for v in args.variants.split(",") if v.strip()]
    py = sys.executable
    runner = Runner(args.dry_run, gpu_slots(args.gpus, args.runs_per_gpu))
    env = mlflow_env(None, {"OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1" if args.smoke else "8")})
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(out)
    started = datetime.datetime.now(datetime.UTC)

    # 1. shards
    lo, hi = (64, 100) if args.smoke else LENGTHS[args.length]
    seq_len = hi
    if not (data / "test" / "manifest.json").is_file():
        gen = [py, "-m", "sessa_data.cli", "symbolsoup", "--out", str(data), "--min-len",
               str(lo), "--max-len", str(hi), "--seq-len", str(seq_len), "--seed", "0"]
        if args.smoke:
            gen += ["--train", "64", "--valid", "16", "--test", "32"]
        else:   # as many training examples as the budget consumes: each is seen once
            gen += ["--train", str(train_examples(family, args.steps)),
                    "--workers", str(min(32, os.cpu_count() or 1))]
        code = runner.run(gen, env)
        if code:
            return code
    else:
        runner.commands.append(f"# shards already present in {data}")

    # 2. training
    common = [f"data.train={data}/train/manifest.json", f"data.valid={data}/valid/manifest.json",
              f"tracking.uri={uri}"]
    if args.smoke:
        common += [f"data.seq_len={seq_len}", "train.steps=2", "train.micro_batch_size=4",
                   "train.global_batch_size=4", "optim.warmup_steps=1", "eval.max_batches=2",
                   "checkpoint.every=0", "data.num_workers=0", "train.log_every=1"]
    if args.steps:
        common.append(f"train.steps={args.steps}")
    impl = args.impl or ("chunked" if args.smoke else None)
    if impl:
        common.append(f"model.sessa.impl={impl}")
    common += args.extra
    runs: list[dict[str, Any]] = []
    jobs: list[Job] = []
    launch = [py, "-m", "sessa_pt.train"] if args.nproc == 1 else \
        [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(args.nproc), "-m", "sessa_pt.train"]
    for setting in parse_settings(args.setting):
        for variant in variants:
            for seed in seeds:
                # A named setting gets its own directory level and mlflow run name, so the
                # report groups its runs apart from the other settings'.
                key = f"{setting.name}/{variant}-seed{seed}" if setting.name \
                    else f"{variant}-seed{seed}"
                run_dir = out / "runs" / key
                recipe = f"recipes/{family}/{variant}.yaml"
                named = [f"run.name={family}-{variant}-{setting.name}"] if setting.name else []
                cmd = [*launch, recipe, f"run.seed={seed}", f"run.dir={run_dir}", *common,
                       *setting.overrides, *named]
                runs.append({"variant": variant, "seed": seed, "run_dir": run_dir,
                             "setting": setting.name, "key": key})
                jobs.append(Job(cmd, out / "logs" / f"train-{key.replace('/', '-')}.log",
                                run_dir / "STOP", name=f"train {key}"))
    if len(runner.slots) > 1 and not args.dry_run:
        ensure_experiment(uri, family)
    for r, res in zip(runs, runner.run_all(jobs, env, args.max_minutes_per_run), strict=True):
        code = res.code
        r.update(code=code, seconds=res.seconds, stopped=res.stopped or res.killed,
                 summary=read_json(r["run_dir"] / "summary.json"))
        if code:
            print(f"[reproduce] training {r['key']} failed (exit {code})", flush=True)

    # 3. evaluation on the test split
    evaluated, jobs = [], []
    for r in runs:
        if r["code"] and not args.dry_run:
            r["eval"] = {}
            continue
        r["eval_json"] = out / "eval" / f"{r['key']}.json"
        cmd = [py, "-m", "sessa_pt.eval.cli", "task", str(r["run_dir"]), "--data",
               f"{data}/test/manifest.json", "--json", str(r["eval_json"]), "--mlflow-run-id",
               "auto", "--tracking-uri", uri, "--batch-size", "64" if not args.smoke else "16"]
        if impl:
            cmd += ["--sessa-impl", impl]
        evaluated.append(r)
        jobs.append(Job(cmd, log=out / "logs" / f"eval-{r['key'].replace('/', '-')}.log",
                        name=f"eval {r['key']}"))
    for r, res in zip(evaluated, runner.run_all(jobs, env), strict=True):
        r["eval"] = read_json(r["eval_json"]) if not res.code else {}
        r["eval_seconds"] = res.seconds

    # 4. report and RESULTS.md
    report_dir = out / "report"
    code = runner.run([py, "-m", "sessa_pt.eval.report", "--tracking-uri", uri,
                      "--experiment", family, "--out", str(report_dir)], env)
    if code:
        print("[reproduce] the comparison report failed; RESULTS.md is still written",
              flush=True)
    if args.dry_run:
        return 0
    results = pathlib.Path(args.results) if args.results else out / "RESULTS.md"
    results.write_text(results_markdown(args, family, lo, hi, runs, runner.commands, started,
                                        uri, report_dir if not code else None))
    print(f"\n[reproduce] wrote {results}")
    print(results.read_text())
    return 0 if all(r["code"] == 0 and r.get("eval") for r in runs) else 1


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def results_markdown(args, family: str, lo: int, hi: int, runs: list[dict[str, Any]],
                     commands: list[str], started: datetime.datetime, uri: str,
                     report_dir: pathlib.Path | None) -> str:
    from sessa_pt.config import load_config
    from sessa_pt.recipes_check import count

    # One row per (setting, variant): the seeds of a row are what mean ± std runs over.
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("setting", ""), r["variant"]), []).append(r)
    swept = any(setting for setting, _ in groups)

    def row_label(setting: str, variant: str) -> str:
        label = LABEL.get(variant, variant)
        return f"{setting} | {label}" if swept else label

    title = "SymbolSoup" + ("" if args.length == 600 else f" at {args.length} tokens")
    lines = [f"# {title}: reproduction{' (SMOKE TEST: 2 steps on tiny data, not a result)' if args.smoke else ''}",
             "",
             (f"Measured {started:%Y-%m-%d %H:%M} UTC on {environment()}. Sequences of {lo}-{hi} "
             "tokens, 20 classes (chance 0.05); accuracy = greedy prediction of the class token "
             "on the held-out test split, mean ± sample std over seeds "
             f"({', '.join(str(s) for s in sorted({r['seed'] for r in runs}))})."), ""]
    head = "| model | params (non-emb) | our accuracy | per seed | paper (Table 1) | steps | train time |"
    lines += [head.replace("| model |", "| setting | model |") if swept else head,
              "|---|---|---|---|---|---|---|" + ("---|" if swept else "")]
    for (setting, variant), rs in groups.items():
        cfg = load_config(ROOT / "recipes" / family / f"{variant}.yaml")
        _, non_emb, _ = count(cfg)
        accs = [r["eval"]["token_acc"] for r in rs if r.get("eval")]
        per_seed = ", ".join(f"s{r['seed']}: {r['eval']['token_acc']:.4f}" if r.get("eval")
                             else f"s{r['seed']}: failed" for r in rs)
        paper = PAPER.get(variant) if args.length == 600 else None
        paper_txt = f"{paper[0]:.4f} ± {paper[1]:.4f}" if paper else "not reported"
        steps = ", ".join(str(r["summary"].get("step", "?")) +
                          (" (stopped)" if r["stopped"] or r["summary"].get("state") not in
                           (None, "finished") else "") for r in rs)
        mins = ", ".join(f"{r['seconds'] / 60:.1f} min" for r in rs)
        lines.append(f"| {row_label(setting, variant)} | {non_emb / 1e6:.2f}M | {_ms(accs)} | "
                     f"{per_seed} | {paper_txt} | {steps} | {mins} |")
    lines += ["", "Accuracy by sequence length (test split, mean over seeds):", ""]
    bins: dict[tuple[str, str], dict[tuple[int, int], list[float]]] = {}
    edges: set[tuple[int, int]] = set()
    for group, rs in groups.items():
        for r in rs:
            for b in (r.get("eval") or {}).get("bins", []):
                e = (math.floor(b["lo"]), math.floor(b["hi"]))
                edges.add(e)
                bins.setdefault(group, {}).setdefault(e, []).append(b["acc"])
    cols = sorted(edges)
    lines.append(("| setting | model | " if swept else "| model | ")
                 + " | ".join(f"{a}-{b}" for a, b in cols) + " |")
    lines.append("|---|" + ("---|" if swept else "") + "---|" * len(cols))
    for group in groups:
        cells = [f"{statistics.fmean(bins[group][e]):.3f}" if e in bins.get(group, {})
                 else "-" for e in cols]
        lines.append(f"| {row_label(*group)} | " + " | ".join(cells) + " |")
    total = sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in runs)
    lines += ["", f"Total time of training + evaluation: {total / 60:.1f} min. mlflow store: "
              f"`{uri}` (experiment `{family}`)" +
              (f"; comparison report: `{report_dir}/report.md`." if report_dir else "."), "",
              ("Recipes: sizes, optimizer, schedule and budget are written in "
              f"`recipes/{family}/base.yaml` (the paper gives none); check the matching with "
              f"`python -m sessa_pt.recipes_check recipes/{family}`."), "",
              "## Commands", "", "```"]
    lines += [f"cd {ROOT}", *commands, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
