"""Comparison report across mlflow runs: ``python -m sessa_pt.eval.report``.

Reads every finished run of ``--experiment`` from one or more tracking stores (the trainer's
default store is per run directory, so pass each with ``--uri``, or give all runs one
``tracking.uri``), groups them (default by ``run.name``: one group per recipe variant, seeds
together) and writes to ``--out``:

- ``report.md``: per group, mean +- sample std over runs (seeds) of the final train loss (mean
  of the last ``--final-window`` logged steps), the final val loss / val perplexity, every task
  accuracy the evaluation CLI logged (``*_acc``, ``*_example_acc``), passkey accuracy, fitted
  memory-tail exponents (``memtail_beta_*``), plus parameters, FLOPs per token and tokens seen;
- ``loss_vs_tokens.png`` (train loss, and val loss dashed, against tokens; log-x),
  ``accuracy_vs_length.png`` (``*_acc_by_length`` / ``*_acc_by_lag`` / passkey curves) and
  ``influence_vs_lag.png`` (``memtail_influence_model``, log-log) when those were logged;
- ``report.json``: the numbers behind the table;

and logs them as artifacts of a new run named ``report`` (tag ``sessa_pt.report=true``, which
later reports skip) in the experiment of the first store.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

REPORT_TAG = "sessa_pt.report"
CURVE_SUFFIXES = ("_acc_by_length", "_acc_by_lag")
SCALAR_PATTERNS = [r".*_acc$", r".*_example_acc$", r"^eval_.*_(ppl|loss)$", r"^memtail_beta_.*"]


@dataclass
class RunData:
    run_id: str
    name: str
    uri: str
    params: dict[str, str]
    metrics: dict[str, float]
    status: str
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def group_key(self, keys: list[str]) -> str:
        vals = []
        for k in keys:
            v = self.params.get(k)
            if v is None and k == "run.name":
                v = self.name
            vals.append(str(v))
        return " / ".join(vals)


def _client(uri: str):
    from sessa_pt.train.tracking import mlflow_client

    return mlflow_client(uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    hist = client.get_metric_history(run_id, key)
    by_step: dict[int, float] = {}
    for m in sorted(hist, key=lambda m: (m.step, m.timestamp)):
        by_step[int(m.step)] = float(m.value)     # a resumed run re-logs steps: keep the last
    return sorted(by_step.items())


def collect_runs(uris: list[str], experiment: str, include_unfinished: bool = False,
                 include_stopped: bool = False) -> list[RunData]:
    """The runs of ``experiment`` in every store: FINISHED ones, plus KILLED ones (the trainer
    stopped on request: a time budget, a STOP file, SIGTERM; it saved and exited cleanly) with
    ``include_stopped``, plus every other status with ``include_unfinished``."""
    keep = {"FINISHED", "KILLED"} if include_stopped else {"FINISHED"}
    runs: list[RunData] = []
    for uri in uris:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            print(f"[report] {uri}: no experiment {experiment!r}; skipped")
            continue
        for r in client.search_runs([exp.experiment_id], max_results=10000):
            if r.data.tags.get(REPORT_TAG) == "true":
                continue
            if r.info.status not in keep and not include_unfinished:
                hint = "--include-stopped" if r.info.status == "KILLED" else \
                    "--include-unfinished"
                print(f"[report] skipping run {r.info.run_id} ({r.info.run_name}): status "
                      f"{r.info.status} ({hint} keeps it)")
                continue
            rd = RunData(r.info.run_id, r.info.run_name or r.info.run_id, uri,
                         dict(r.data.params), dict(r.data.metrics), r.info.status)
            for key in ("loss", "tokens", "val_loss"):
                if key in rd.metrics:
                    rd.histories[key] = _history(client, rd.run_id, key)
            for key in rd.metrics:
                if key.endswith(CURVE_SUFFIXES) or key.startswith("memtail_influence_") or \
                        key == "passkey_acc_by_length":
                    rd.histories[key] = _history(client, rd.run_id, key)
            runs.append(rd)
    return runs


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def run_row(rd: RunData, final_window: int) -> dict[str, float]:
    """The numbers of one run that enter the table."""
    row: dict[str, float] = {}
    loss = rd.histories.get("loss", [])
    if loss:
        tail = [v for _, v in loss[-final_window:]]
        row["final train loss"] = sum(tail) / len(tail)
    for key, label in (("val_loss", "val loss"), ("val_ppl", "val ppl")):
        if key in rd.metrics:
            row[label] = rd.metrics[key]
    for key in sorted(rd.metrics):
        if any(re.match(p, key) for p in SCALAR_PATTERNS) and not key.endswith(CURVE_SUFFIXES):
            row[key] = rd.metrics[key]
    if "passkey_acc" in rd.metrics:
        row["passkey_acc"] = rd.metrics["passkey_acc"]
    row["params non-emb"] = _num(rd.params.get("params_non_embedding"))
    row["GFLOPs/token fwd"] = _num(rd.params.get("flops_per_token_fwd")) / 1e9
    toks = rd.histories.get("tokens")
    row["tokens"] = toks[-1][1] if toks else rd.metrics.get("tokens", math.nan)
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def _fmt(mean: float, std: float, column: str) -> str:
    if math.isnan(mean):
        return "-"
    if column in ("params non-emb", "tokens"):
        scale, unit = (1e9, "B") if mean >= 1e9 else (1e6, "M") if mean >= 1e6 else (1e3, "k")
        txt = f"{mean / scale:.3g}{unit}"
        return txt if math.isnan(std) or std == 0 else f"{txt} ± {std / scale:.2g}{unit}"
    digits = 2 if column == "val ppl" else 4
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(runs: list[RunData], group_by: list[str], final_window: int
              ) -> tuple[list[str], list[dict[str, Any]]]:
    groups: dict[str, list[RunData]] = defaultdict(list)
    for rd in runs:
        groups[rd.group_key(group_by)].append(rd)
    rows_by_group = {g: [run_row(r, final_window) for r in rs] for g, rs in groups.items()}
    first = ["final train loss", "val loss", "val ppl"]
    last = ["params non-emb", "GFLOPs/token fwd", "tokens"]
    middle = sorted({k for rows in rows_by_group.values() for row in rows for k in row}
                    - set(first) - set(last), key=lambda k: (k.startswith("memtail"), k))
    columns = [c for c in first + middle + last
               if any(c in row for rows in rows_by_group.values() for row in rows)]
    table = []
    for g in sorted(groups):
        rows = rows_by_group[g]
        seeds = sorted({groups[g][i].params.get("run.seed", "?") for i in range(len(rows))})
        entry: dict[str, Any] = {"group": g, "runs": len(rows), "seeds": seeds,
                                 "run_ids": [r.run_id for r in groups[g]]}
        for c in columns:
            entry[c] = mean_std([row.get(c, math.nan) for row in rows])
        table.append(entry)
    return columns, table


def markdown(columns: list[str], table: list[dict[str, Any]], group_by: list[str],
             experiment: str, uris: list[str], plots: list[str], final_window: int) -> str:
    lines = [f"# Comparison report: experiment `{experiment}`", "",
             (f"Runs grouped by `{', '.join(group_by)}`; each cell is the mean ± sample standard "
             "deviation over the group's runs (seeds); no ± when a group has one run. "
             f"Final train loss = mean of the last {final_window} logged steps. Accuracy "
             "columns are the evaluation CLI's metrics (`<task>_<split>_acc` = token accuracy at "
             "the answer positions)."), "",
             "Stores: " + ", ".join(f"`{u}`" for u in uris), ""]
    head = ["group", "runs", *columns]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for e in table:
        cells = [f"`{e['group']}`", str(e["runs"])]
        cells += [_fmt(*e[c], c) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines.append("Runs: " + "; ".join(f"`{e['group']}`: " + ", ".join(e["run_ids"])
                                      for e in table))
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[RunData], group_by: list[str], path: pathlib.Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, Any] = {}
    drawn = False
    for rd in sorted(runs, key=lambda r: r.group_key(group_by)):
        g = rd.group_key(group_by)
        tokens = dict(rd.histories.get("tokens", []))
        pts = [(tokens[s], v) for s, v in rd.histories.get("loss", []) if s in tokens]
        if not pts:
            continue
        first = g not in colors          # label each group once
        color = colors.setdefault(g, f"C{len(colors) % 10}")
        ax.plot(*zip(*pts, strict=True), color=color, lw=1, alpha=0.8,
                label=f"{g} train" if first else None)
        val = [(tokens[s], v) for s, v in rd.histories.get("val_loss", []) if s in tokens]
        if val:
            ax.plot(*zip(*val, strict=True), "--o", color=color, ms=3, lw=1,
                    label=f"{g} val" if first else None)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss against tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_x: dict[int, list[float]] = defaultdict(list)
    for c in curves:
        for x, y in c:
            by_x[x].append(y)
    xs = sorted(by_x)
    return xs, [statistics.fmean(by_x[x]) for x in xs]


def plot_curves(runs: list[RunData], group_by: list[str], path: pathlib.Path, select,
                xlabel: str, ylabel: str, title: str, loglog: bool) -> bool:
    """Mean over a group's runs of every logged curve ``select(key)`` accepts."""
    curves: dict[tuple[str, str], list] = defaultdict(list)
    for rd in runs:
        for key, hist in rd.histories.items():
            if select(key) and hist:
                curves[(rd.group_key(group_by), key)].append(hist)
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (g, key), cs in sorted(curves.items()):
        xs, ys = _mean_curve(cs)
        if loglog:
            keep = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
            if not keep:
                continue
            xs, ys = (list(t) for t in zip(*keep, strict=True))
            ax.loglog(xs, ys, "-o", ms=2, label=f"{g} ({key}, n={len(cs)})")
        else:
            ax.plot(xs, ys, "-o", ms=3, label=f"{g} ({key}, n={len(cs)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def log_report(uri: str, experiment: str, out: pathlib.Path, files: list[pathlib.Path],
               params: dict[str, str]) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name="report", tags={REPORT_TAG: "true"})
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, v[:6000])
    for f in files:
        client.log_artifact(rid, str(f))
    client.set_terminated(rid)
    return rid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sessa_pt.eval.report",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tracking-uri", required=True, help="mlflow store to read (and log to)")
    p.add_argument("--uri", action="append", default=[], metavar="URI",
                   help="another store to read runs from (repeatable)")
    p.add_argument("--experiment", required=True, help="mlflow experiment name")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--group-by", default="run.name",
                   help="comma-separated run params to group by (e.g. model.mixer,model.block)")
    p.add_argument("--final-window", type=int, default=20,
                   help="final train loss = mean of this many last logged steps")
    p.add_argument("--include-stopped", action="store_true",
                   help="also report runs that the trainer stopped on request (mlflow status "
                        "KILLED: a time budget, a STOP file, SIGTERM), as a budget-capped "
                        "comparison evaluates them")
    p.add_argument("--include-unfinished", action="store_true",
                   help="also report runs that are still running or failed")
    p.add_argument("--no-log", action="store_true", help="do not log the report to mlflow")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uris = [args.tracking_uri, *args.uri]
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
    runs = collect_runs(uris, args.experiment, args.include_unfinished, args.include_stopped)
    if not runs:
        print(f"[report] no finished runs in experiment {args.experiment!r} of {uris}")
        return 1
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if plot_loss(runs, group_by, out / "loss_vs_tokens.png"):
        plots.append("loss_vs_tokens.png")
    if plot_curves(runs, group_by, out / "accuracy_vs_length.png",
                   lambda k: k.endswith(CURVE_SUFFIXES) or k == "passkey_acc_by_length",
                   "length or lag (tokens)", "accuracy", "accuracy against length / lag",
                   loglog=False):
        plots.append("accuracy_vs_length.png")
    if plot_curves(runs, group_by, out / "influence_vs_lag.png",
                   lambda k: k == "memtail_influence_model", "lag", "influence",
                   "memory tail: influence against lag (whole model)", loglog=True):
        plots.append("influence_vs_lag.png")
    columns, table = summarize(runs, group_by, args.final_window)
    md = markdown(columns, table, group_by, args.experiment, uris, plots, args.final_window)
    (out / "report.md").write_text(md)
    from sessa_pt.eval.common import write_json

    write_json(out / "report.json", {"experiment": args.experiment, "uris": uris,
                                     "group_by": group_by, "columns": columns,
                                     "groups": [{**e, **{c: list(e[c]) for c in columns}}
                                                for e in table]})
    print(md)
    files = [out / "report.md", out / "report.json", *(out / p for p in plots)]
    print("[report] wrote " + ", ".join(str(f) for f in files))
    if not args.no_log:
        rid = log_report(args.tracking_uri, args.experiment, out, files,
                         {"group_by": args.group_by, "uris": ",".join(uris),
                          "runs": ",".join(r.run_id for r in runs)})
        print(f"[report] logged as mlflow run {rid} (run name 'report') in {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
