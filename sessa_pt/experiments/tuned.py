"""A tuned comparison in two phases, for any experiment (:class:`Experiment`):

1. ``sweep``: every model at every learning rate of ``Experiment.lrs`` (one seed, a short
   budget), evaluated on the VALIDATION split; each model's rate is the best by the
   experiment's selection metric. Writes ``<out>/sweep/choice.json``.
2. ``seeds``: every model at its own rate (read from the sweep's ``choice.json``, which may come
   from another machine: ``--choice PATH``), for each of ``--seeds`` (default 1, 2, 3), at the
   final budget; evaluated on the TEST split, memory tail per run. Writes
   ``<out>/seeds/summary.json`` and ``RESULTS.md`` (:mod:`sessa_pt.experiments.results`) and
   the comparison report's PNGs (``python -m sessa_pt.eval.report``).

Each run has its own directory (``<out>/<phase>/runs/<variant>-lr<lr>`` or
``<variant>-seed<s>``), log, mlflow run name (``<experiment>-<variant>``; the report groups
seeds by it) and wall time. All runs of a phase share the ``--gpus`` x ``--runs-per-gpu``
slots of :class:`sessa_pt.experiments.runner.Runner` and one mlflow store.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
from typing import Any, ClassVar

from sessa_pt.experiments import results as res
from sessa_pt.experiments.runner import (
    ROOT,
    Job,
    Runner,
    ensure_experiment,
    environment,
    git_commit,
    gpu_slots,
    read_json,
    tracking_uri,
    utc_now,
)
from sessa_pt.train.nonfinite import EXIT_DIVERGED
from sessa_pt.train.tracking import mlflow_env

PHASES = ("sweep", "seeds", "all")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training steps and warmup of one phase (the rest of the schedule is the recipe's)."""
    steps: int
    warmup: int
    max_minutes: float = 0.0     # per run; the STOP file ends it (0 = no limit)

    def overrides(self) -> list[str]:
        if self.warmup >= self.steps:
            raise SystemExit(f"warmup {self.warmup} must be below steps {self.steps}")
        return [f"train.steps={self.steps}", f"optim.warmup_steps={self.warmup}"]

    def text(self, tokens_per_step: int) -> str:
        return (f"{self.steps} steps x {tokens_per_step:,} tokens = "
                f"{self.steps * tokens_per_step / 1e6:.1f}M tokens, warmup {self.warmup}"
                + (f", at most {self.max_minutes:g} min" if self.max_minutes else ""))


class Experiment:
    """What differs between experiments; the phases, runner and results are shared."""

    name: str = ""                         # results/<name>/, mlflow experiment
    title: str = ""
    family: str = ""                       # recipes/<family>/<variant>.yaml
    variants: tuple[str, ...] = ("sessa", "transformer", "mamba2")
    labels: ClassVar[dict[str, str]] = {"sessa": "Sessa", "transformer": "Transformer",
                              "mamba2": "Mamba2"}
    paper: ClassVar[dict[str, dict[str, float]]] = {}
    metrics: tuple[str, ...] = ("token_acc",)  # reported, in order
    select_metric: str = "token_acc"       # chosen on the validation split
    select_mode: str = "max"               # max | min
    breakdown: str | None = None           # "length" | "lag": per-bin accuracy table
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    min_lr_ratio: float = 0.1              # optim.min_lr = lr x this
    sweep_budget: Budget = Budget(300, 30)
    final_budget: Budget = Budget(1000, 100)
    smoke_budget: Budget = Budget(2, 1)
    description: str = ""

    def default_data(self) -> pathlib.Path:
        return ROOT / "data" / self.name

    def prepare_data(self, ctx: Context, train_examples: int) -> int:
        """Generate (or check) the data in ``ctx.data`` with ``ctx.runner``; returns a nonzero
        exit code on failure. ``train_examples``: what the longest phase consumes."""
        raise NotImplementedError

    def train_overrides(self, data: pathlib.Path, smoke: bool) -> list[str]:
        raise NotImplementedError

    def eval_command(self, py: str, run_dir: pathlib.Path, data: pathlib.Path, split: str,
                     out_json: pathlib.Path, smoke: bool) -> list[str]:
        raise NotImplementedError

    def metrics_of(self, ev: dict[str, Any]) -> dict[str, float]:
        return {"token_acc": ev["token_acc"], "example_acc": ev["example_acc"]}

    def test_split(self, data: pathlib.Path) -> str:
        return f"`{data}/test`"

    def tokens_per_step(self) -> int:
        from sessa_pt.config import load_config

        cfg = load_config(self.recipe(self.variants[0]))
        return cfg.train.global_batch_size * cfg.data.seq_len

    def recipe(self, variant: str) -> pathlib.Path:
        return ROOT / "recipes" / self.family / f"{variant}.yaml"

    def smoke_overrides(self) -> list[str]:
        return ["train.micro_batch_size=4", "train.global_batch_size=4", "eval.max_batches=2",
                "checkpoint.every=0", "data.num_workers=0", "train.log_every=1",
                "model.sessa.impl=chunked"]


def build_parser(exp: Experiment) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m sessa_pt.experiments {exp.name}",
                                description=f"{exp.title}: " + __doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("phase", choices=PHASES, help="sweep, seeds, or all (sweep then seeds)")
    p.add_argument("--out", help=f"output directory (default runs/{exp.name}, _smoke with "
                                 "--smoke)")
    p.add_argument("--data", help=f"data directory (default data/{exp.name}; <out>/data with "
                                  "--smoke)")
    p.add_argument("--variants", default=",".join(exp.variants))
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in exp.lrs),
                   help="learning rates of the sweep (at least 3 for a tuned comparison)")
    p.add_argument("--seeds", default="1,2,3", help="run.seed values of the final runs")
    p.add_argument("--sweep-seed", type=int, default=0, help="run.seed of the sweep runs")
    p.add_argument("--sweep-steps", type=int, default=exp.sweep_budget.steps)
    p.add_argument("--sweep-warmup", type=int, default=exp.sweep_budget.warmup)
    p.add_argument("--sweep-minutes", type=float, default=exp.sweep_budget.max_minutes,
                   help="per-run time limit in the sweep (0 = none)")
    p.add_argument("--steps", type=int, default=exp.final_budget.steps,
                   help="train.steps of the final runs")
    p.add_argument("--warmup", type=int, default=exp.final_budget.warmup)
    p.add_argument("--minutes", type=float, default=exp.final_budget.max_minutes,
                   help="per-run time limit of the final runs (0 = none)")
    p.add_argument("--choice", help="the sweep's choice.json for the seeds phase (default "
                                    "<out>/sweep/choice.json)")
    p.add_argument("--lr", action="append", default=[], metavar="VARIANT=LR",
                   help="set a model's rate for the seeds phase instead of the sweep's choice")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids (runs in slots)")
    p.add_argument("--runs-per-gpu", type=int, default=1)
    p.add_argument("--no-memory-tail", action="store_true")
    p.add_argument("--results", help="also write the RESULTS.md section here")
    p.add_argument("--study", help="name a seeds call that varies the comparison's settings "
                                   "(e.g. --warmup 450, optim.grad_clip=10, another --lr) to "
                                   "study them: publish keeps it apart, in "
                                   "results/<experiment>/studies/<name>/, and the comparison's "
                                   "own table untouched")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny data, 2 steps per run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("extra", nargs="*", help="extra key=value training overrides (every run)")
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise SystemExit(f"{what}: write comma-separated numbers ({err})") from None
    if not vals:
        raise SystemExit(f"{what}: give at least one value")
    return vals


@dataclasses.dataclass
class Context:
    exp: Experiment
    args: argparse.Namespace
    out: pathlib.Path
    data: pathlib.Path
    variants: list[str]
    runner: Runner
    env: dict[str, str]
    py: str = sys.executable


def make_context(exp: Experiment, args: argparse.Namespace) -> Context:
    suffix = "_smoke" if args.smoke else ""
    out = pathlib.Path(args.out or f"runs/{exp.name}{suffix}").resolve()
    data = pathlib.Path(args.data or (out / "data" if args.smoke else exp.default_data()))
    data = data if data.is_absolute() else (ROOT / data)
    variants = [v for v in args.variants.split(",") if v.strip()]
    if bad := [v for v in variants if not exp.recipe(v).is_file()]:
        raise SystemExit(f"--variants: no recipe {exp.recipe(bad[0])}; choose from "
                         f"{', '.join(exp.variants)}")
    env = mlflow_env("file:", {"OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1" if args.smoke else "4")})
    return Context(exp, args, out, data, variants,
                   Runner(args.dry_run, gpu_slots(args.gpus, args.runs_per_gpu)), env)


def _train_jobs(ctx: Context, phase: str, plan: list[tuple[str, float, int, str]],
                budget: Budget, uri: str) -> tuple[list[dict[str, Any]], list[Job]]:
    """One training job per (variant, lr, seed, key) of ``plan``."""
    exp, args = ctx.exp, ctx.args
    common = [*exp.train_overrides(ctx.data, args.smoke), f"tracking.uri={uri}",
              f"tracking.experiment={exp.name}-{phase}", *budget.overrides(), *args.extra]
    if args.smoke:
        common += exp.smoke_overrides()
    runs, jobs = [], []
    for variant, lr, seed, key in plan:
        run_dir = ctx.out / phase / "runs" / key
        cmd = [ctx.py, "-m", "sessa_pt.train", str(exp.recipe(variant).relative_to(ROOT)),
               f"run.seed={seed}", f"run.dir={run_dir}", f"run.name={exp.name}-{variant}"
               + (f"-lr{lr:g}" if phase == "sweep" else ""),
               f"optim.lr={lr:g}", f"optim.min_lr={lr * exp.min_lr_ratio:g}", *common]
        runs.append({"variant": variant, "lr": lr, "seed": seed, "key": key,
                     "run_dir": str(run_dir), "budget": dataclasses.asdict(budget)})
        jobs.append(Job(cmd, ctx.out / phase / "logs" / f"train-{key}.log", run_dir / "STOP",
                        name=f"train {key}"))
    return runs, jobs


def _train_and_eval(ctx: Context, phase: str, plan: list[tuple[str, float, int, str]],
                    budget: Budget, split: str) -> list[dict[str, Any]]:
    exp = ctx.exp
    uri = tracking_uri(ctx.out / phase)
    if not ctx.args.dry_run:
        (ctx.out / phase).mkdir(parents=True, exist_ok=True)
        ensure_experiment(uri, f"{exp.name}-{phase}")
    runs, jobs = _train_jobs(ctx, phase, plan, budget, uri)
    first = len(ctx.runner.commands)      # run_all records one command per job, in order
    for i, (r, jr) in enumerate(zip(runs, ctx.runner.run_all(jobs, ctx.env, budget.max_minutes),
                                    strict=True)):
        summary = read_json(pathlib.Path(r["run_dir"]) / "summary.json")
        r.update(code=jr.code, diverged=jr.code == EXIT_DIVERGED, train_seconds=jr.seconds,
                 stopped=jr.stopped or jr.killed,
                 oom_retries=jr.oom_retries,
                 step=summary.get("step"), val_loss=summary.get("val_loss"),
                 command=ctx.runner.commands[first + i])
    evaluated, ejobs = [], []
    for r in runs:
        if r["code"] and not ctx.args.dry_run:
            why = "diverged" if r["diverged"] else "failed"
            print(f"[{exp.name}] training {r['key']} {why} (exit {r['code']}); not evaluated",
                  flush=True)
            continue
        r["eval_json"] = str(ctx.out / phase / "eval" / f"{r['key']}-{split}.json")
        cmd = exp.eval_command(ctx.py, pathlib.Path(r["run_dir"]), ctx.data, split,
                               pathlib.Path(r["eval_json"]), ctx.args.smoke)
        cmd += ["--mlflow-run-id", "auto", "--tracking-uri", uri]
        evaluated.append(r)
        ejobs.append(Job(cmd, ctx.out / phase / "logs" / f"eval-{r['key']}.log",
                         name=f"eval {r['key']}"))
    for r, jr in zip(evaluated, ctx.runner.run_all(ejobs, ctx.env), strict=True):
        ev = read_json(pathlib.Path(r["eval_json"])) if not jr.code else {}
        r["eval_seconds"] = jr.seconds
        r["metrics"] = exp.metrics_of(ev) if ev else {}
        r["bins"] = ev.get("bins", [])
    return runs


def _best_rate(scores: dict[float, float], val_loss: dict[float, Any], mode: str) -> float:
    """The rate with the best score; a tie (e.g. every rate still at chance accuracy) goes to
    the lower final validation loss, then to the lower rate."""
    def loss(lr: float) -> float:
        x = val_loss.get(lr)
        return x if isinstance(x, (int, float)) and math.isfinite(x) else math.inf
    sign = -1.0 if mode == "max" else 1.0
    return min(scores, key=lambda lr: (sign * scores[lr], loss(lr), lr))


def run_sweep(ctx: Context) -> dict[str, Any]:
    exp, args = ctx.exp, ctx.args
    lrs = _floats(args.lrs, "--lrs")
    if len(lrs) < 3 and not args.smoke:
        raise SystemExit(f"--lrs {args.lrs}: a tuned comparison sweeps at least 3 learning "
                         "rates per model (fewer only with --smoke)")
    budget = exp.smoke_budget if args.smoke else Budget(args.sweep_steps, args.sweep_warmup,
                                                        args.sweep_minutes)
    plan = [(v, lr, args.sweep_seed, f"{v}-lr{lr:g}") for v in ctx.variants for lr in lrs]
    runs = _train_and_eval(ctx, "sweep", plan, budget, "valid")
    table: dict[str, dict[str, float | None]] = {}
    chosen: dict[str, float] = {}
    for v in ctx.variants:
        scores = {lr: r["metrics"].get(exp.select_metric) for r in runs
                  if r["variant"] == v for lr in [r["lr"]] if r.get("metrics")}
        table[v] = {f"{lr:g}": scores.get(lr) for lr in lrs}
        ok = {lr: s for lr, s in scores.items() if s is not None}
        if ok:
            chosen[v] = _best_rate(ok, {r["lr"]: r.get("val_loss") for r in runs
                                        if r["variant"] == v}, exp.select_mode)
    choice = {"experiment": exp.name, "select_metric": exp.select_metric,
              "select_mode": exp.select_mode, "split": "valid", "lrs": lrs,
              "seed": args.sweep_seed, "budget": budget.text(exp.tokens_per_step()),
              "table": table, "chosen": chosen, "git_commit": git_commit(),
              "runs": [{k: r.get(k) for k in ("variant", "lr", "seed", "metrics", "val_loss",
                                               "step", "train_seconds", "stopped", "diverged",
                                               "command")}
                       for r in runs], "smoke": args.smoke}
    if not args.dry_run:
        res.write_summary(ctx.out / "sweep" / "choice.json", choice)
        print(f"[{exp.name}] sweep: chosen learning rates {chosen} -> "
              f"{ctx.out / 'sweep' / 'choice.json'}", flush=True)
        if missing := [v for v in ctx.variants if v not in chosen]:
            print(f"[{exp.name}] sweep: every run of {missing} failed", flush=True)
    return choice


def _chosen_lrs(ctx: Context, choice: dict[str, Any] | None) -> dict[str, float]:
    lrs: dict[str, float] = {}
    path = pathlib.Path(ctx.args.choice) if ctx.args.choice else \
        ctx.out / "sweep" / "choice.json"
    if choice is None and path.is_file():
        choice = read_json(path)
    if choice:
        lrs.update({v: float(x) for v, x in choice.get("chosen", {}).items()})
    for spec in ctx.args.lr:
        v, sep, x = spec.partition("=")
        if not sep:
            raise SystemExit(f"--lr {spec!r}: write VARIANT=LR, e.g. --lr sessa=1e-3")
        lrs[v.strip()] = _floats(x, f"--lr {spec}")[0]
    if missing := [v for v in ctx.variants if v not in lrs]:
        if ctx.args.dry_run:   # a plan without a sweep: show the first rate
            return {**{v: _floats(ctx.args.lrs, "--lrs")[0] for v in missing}, **lrs}
        raise SystemExit(f"no learning rate for {missing}: run the sweep phase first "
                         f"(it writes {path}), pass --choice PATH, or --lr VARIANT=LR")
    return lrs


def run_seeds(ctx: Context, choice: dict[str, Any] | None = None) -> dict[str, Any]:
    from sessa_pt.config import load_config
    from sessa_pt.recipes_check import count

    exp, args = ctx.exp, ctx.args
    lrs = _chosen_lrs(ctx, choice)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget = exp.smoke_budget if args.smoke else Budget(args.steps, args.warmup, args.minutes)
    plan = [(v, lrs[v], s, f"{v}-seed{s}") for v in ctx.variants for s in seeds]
    runs = _train_and_eval(ctx, "seeds", plan, budget, "test")
    if not args.no_memory_tail:
        _memory_tails(ctx, runs)
    for r in runs:
        cfg = load_config(exp.recipe(r["variant"]), list(args.extra))
        _, non_emb, _ = count(cfg)
        r["params_non_embedding"] = non_emb
        r["dynamics"] = res.training_dynamics(pathlib.Path(r["run_dir"]), cfg.optim.grad_clip,
                                              budget.warmup)
    if args.dry_run:
        return {}
    plots = _report(ctx)
    sweep = choice or (read_json(pathlib.Path(args.choice)) if args.choice else
                       read_json(ctx.out / "sweep" / "choice.json"))
    summary = {"experiment": exp.name, "title": exp.title, "description": exp.description,
               "started": f"{utc_now():%Y-%m-%d %H:%M} UTC", "environment": environment(),
               "git_commit": git_commit(), "smoke": args.smoke, "variants": ctx.variants,
               "all_variants": list(exp.variants),
               "labels": exp.labels, "paper": exp.paper, "metrics": list(exp.metrics),
               "breakdown": exp.breakdown, "budget": budget.text(exp.tokens_per_step()),
               "test_split": exp.test_split(ctx.data), "sweep": sweep or None,
               "aggregate": res.aggregate(runs, list(exp.metrics)), "plots": plots,
               "runs": runs, "commands": [f"cd {ROOT}", *ctx.runner.commands],
               "study": args.study, "overrides": list(args.extra)}
    res.write_summary(ctx.out / "seeds" / "summary.json", summary)
    text = res.results_markdown(summary)
    (ctx.out / "seeds" / "RESULTS.md").write_text(text)
    if args.results:
        pathlib.Path(args.results).write_text(text)
    print(text)
    return summary


def _memory_tails(ctx: Context, runs: list[dict[str, Any]]) -> None:
    jobs, targets = [], []
    uri = tracking_uri(ctx.out / "seeds")
    for r in runs:
        if r.get("code") and not ctx.args.dry_run:
            continue
        out_json = ctx.out / "seeds" / "memtail" / f"{r['key']}.json"
        cmd = [ctx.py, "-m", "sessa_pt.eval.cli", "memory-tail", r["run_dir"], "--json",
               str(out_json), "--mlflow-run-id", "auto", "--tracking-uri", uri]
        if ctx.args.smoke:
            cmd += ["--seq-len", "48", "--n-lags", "6", "--fit-min-lag", "4", "--probes", "2",
                    "--sessa-impl", "chunked"]
        jobs.append(Job(cmd, ctx.out / "seeds" / "logs" / f"memtail-{r['key']}.log",
                        name=f"memory-tail {r['key']}"))
        targets.append((r, out_json))
    for (r, out_json), jr in zip(targets, ctx.runner.run_all(jobs, ctx.env), strict=True):
        tail = read_json(out_json) if not jr.code else {}
        r["memory_tail"] = [{"layer": row["layer"], "mixer": row["mixer"], "beta": row["beta"],
                             "r2_power": row.get("r2_power")} for row in tail.get("layers", [])]
        if jr.code:     # the results say so, instead of an empty table
            r["memory_tail_failed"] = jr.code


def _report(ctx: Context) -> list[str]:
    """The comparison report (tables and PNGs) over the final runs; returns the PNG paths."""
    report = ctx.out / "seeds" / "report"
    code = ctx.runner.run([ctx.py, "-m", "sessa_pt.eval.report", "--tracking-uri",
                           tracking_uri(ctx.out / "seeds"), "--experiment",
                           f"{ctx.exp.name}-seeds", "--out", str(report), "--no-log",
                           "--include-stopped"],
                          ctx.env)
    if code:
        print(f"[{ctx.exp.name}] the comparison report failed; RESULTS.md is still written",
              flush=True)
        return []
    return sorted(str(p) for p in report.glob("*.png"))


def _check_study(args: argparse.Namespace) -> None:
    if not args.study:
        return
    if args.phase != "seeds":
        raise SystemExit(f"--study is for the seeds phase (runs beside the comparison at its "
                         f"chosen or given rates); phase {args.phase} would publish a sweep "
                         "over the comparison's own choice.json")
    if not res.STUDY_NAME.fullmatch(args.study):
        raise SystemExit(f"--study {args.study!r}: use letters, digits, '_' and '-' (it names "
                         "a folder), e.g. --study warmup450")


def main(exp: Experiment, argv: list[str] | None = None) -> int:
    args = build_parser(exp).parse_intermixed_args(argv)
    _check_study(args)
    ctx = make_context(exp, args)
    if not args.dry_run:
        ctx.out.mkdir(parents=True, exist_ok=True)
    steps = exp.smoke_budget.steps if args.smoke else max(args.steps, args.sweep_steps)
    from sessa_pt.config import load_config

    batch = load_config(exp.recipe(ctx.variants[0])).train.global_batch_size
    if args.smoke:
        batch = 4
    if args.phase == "seeds":
        _chosen_lrs(ctx, None)      # fail before the data work when no rate is known
    if code := exp.prepare_data(ctx, steps * batch):
        return code
    choice = None
    if args.phase in ("sweep", "all"):
        choice = run_sweep(ctx)
    if args.phase in ("seeds", "all"):
        summary = run_seeds(ctx, choice)
        if not args.dry_run:
            runs = summary["runs"]
            return 0 if runs and all(r.get("metrics") for r in runs) else 1
    return 0
