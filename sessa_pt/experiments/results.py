"""Results of a tuned comparison: statistics over seeds, ``summary.json`` and the RESULTS.md
section (tables beside the paper's numbers, per-bin breakdowns, wall times, every command).

The summary is the single source of the tables: ``write_results`` reads nothing else, so a
table can be rebuilt from a ``summary.json`` alone (``python -m sessa_pt.experiments
EXPERIMENT report --summary PATH``).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics
from typing import Any

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (beyond: the normal's).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.960


def mean_std_ci(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample std and the 95% t-interval of the mean (None with fewer than 2 values)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "ci95_lo": None, "ci95_hi": None}
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95_lo": None, "ci95_hi": None}
    std = statistics.stdev(vals)
    half = t_quantile_975(len(vals) - 1) * std / math.sqrt(len(vals))
    return {"n": len(vals), "mean": mean, "std": std, "ci95_lo": mean - half,
            "ci95_hi": mean + half}


def fmt_stat(s: dict[str, Any], digits: int = 4) -> str:
    if not s.get("n"):
        return "-"
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def fmt_ci(s: dict[str, Any], digits: int = 4) -> str:
    if s.get("ci95_lo") is None:
        return "-"
    return f"[{s['ci95_lo']:.{digits}f}, {s['ci95_hi']:.{digits}f}]"


def memory_tail_table(runs: list[dict[str, Any]], variants: list[str],
                      labels: dict[str, str]) -> list[str]:
    """The fitted tail exponent per layer and for the whole model, mean ± std over each model's
    seeds (``sessa-eval memory-tail`` of every final run)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for row in r.get("memory_tail") or []:
            if isinstance(row.get("beta"), (int, float)) and math.isfinite(row["beta"]):
                rows.setdefault(r["variant"], {}).setdefault(str(row["layer"]), []).append(
                    row["beta"])
    if not rows:
        return []
    layers = sorted({k for per in rows.values() for k in per if k != "model"}, key=_layer_key)
    lines = [("Memory tail (fitted beta, influence ~ lag^-beta: smaller is a heavier tail; "
              "mean ± std over seeds):"), "",
             "| model | seeds | whole model | " + " | ".join(f"layer {k}" for k in layers)
             + " |", "|---|---|---|" + "---|" * len(layers)]
    for v in [v for v in variants if v in rows]:
        per = rows[v]
        cells = [fmt_stat(mean_std_ci(per.get(k, [])), digits=2) for k in ["model", *layers]]
        n = max(len(x) for x in per.values())
        lines.append(f"| {labels.get(v, v)} | {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _layer_key(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.isdigit() else (1 << 30, layer)


def final_val_loss(runs: list[dict[str, Any]], variants: list[str],
                   labels: dict[str, str]) -> list[str]:
    """The final runs' last validation loss (the trainer's, on the validation split the rates
    were chosen on) per model, beside the test metrics: where the test split is out of
    distribution (the LM's held-out source), this is the in-distribution reading."""
    rows = []
    for v in variants:
        vals = [r["val_loss"] for r in runs if r["variant"] == v
                and isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
        if vals:
            rows.append(f"| {labels.get(v, v)} | {fmt_stat(mean_std_ci(vals))} | "
                        + ", ".join(f"{x:.4f}" for x in vals) + " |")
    if not rows:
        return []
    title = ("Validation loss at the end of training (the validation split, the trainer's "
             "last evaluation):")
    return [title, "", "| model | val loss (mean ± std) | per seed |", "|---|---|---|",
            *rows, ""]


def aggregate(runs: list[dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant and metric: mean, std and 95% interval over the variant's seeds."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        out.setdefault(r["variant"], {})
    for variant in out:
        rs = [r for r in runs if r["variant"] == variant]
        out[variant] = {m: mean_std_ci([r["metrics"].get(m) for r in rs
                                        if r.get("metrics", {}).get(m) is not None])
                        for m in metrics}
    return out


def training_dynamics(run_dir: pathlib.Path, grad_clip: float, warmup: int) -> dict[str, Any]:
    """What a run's per-step log says about its stability: the largest pre-clip gradient norm
    and its step, the largest around the end of warmup (steps warmup/2 .. 2 warmup), the share
    of steps whose norm exceeded the clip (``grad_clip`` > 0), the loss spikes that the trainer
    recorded (spikes.jsonl) and the non-finite steps. {} without a log."""
    log_path = run_dir / "train_log.jsonl"
    if not log_path.is_file():
        return {}
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    norms = [(r["step"], r["grad_norm"]) for r in rows
             if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]
    if not norms:
        return {}
    step_max, g_max = max(norms, key=lambda sg: sg[1])
    around = [g for st, g in norms if warmup // 2 <= st <= 2 * max(warmup, 1)]
    spikes = run_dir / "spikes.jsonl"
    return {"max_grad_norm": g_max, "max_grad_norm_step": step_max,
            "max_grad_norm_end_of_warmup": max(around) if around else None,
            "clipped_fraction": (sum(g > grad_clip for _, g in norms) / len(norms)
                                 if grad_clip > 0 else None),
            "loss_spikes": (len([x for x in spikes.read_text().splitlines() if x.strip()])
                            if spikes.is_file() else 0),
            "nonfinite_steps": sum(bool(r.get("nonfinite")) for r in rows)}


def dynamics_table(runs: list[dict[str, Any]], variants: list[str], labels: dict[str, str]
                   ) -> list[str]:
    """Training stability per run (from :func:`training_dynamics`), a row per run."""
    have = [r for r in runs if r.get("dynamics")]
    if not have:
        return []
    lines = ["Training stability per run (pre-clip gradient norm from the per-step log):", "",
             ("| model | seed | max grad norm (step) | max around the end of warmup | "
              "steps clipped | loss spikes | non-finite steps |"), "|---|---|---|---|---|---|---|"]
    for v in variants:
        for r in (r for r in have if r["variant"] == v):
            d = r["dynamics"]
            warm = d.get("max_grad_norm_end_of_warmup")
            clip = d.get("clipped_fraction")
            lines.append(f"| {labels.get(v, v)} | {r['seed']} | {d['max_grad_norm']:.2f} "
                         f"({d['max_grad_norm_step']}) | "
                         f"{'-' if warm is None else f'{warm:.2f}'} | "
                         f"{'-' if clip is None else f'{100 * clip:.1f}%'} | "
                         f"{d['loss_spikes']} | {d['nonfinite_steps']} |")
    return lines + [""]


def write_summary(path: pathlib.Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)


def bins_table(runs: list[dict[str, Any]], variants: list[str], labels: dict[str, str],
               key: str) -> list[str]:
    """Accuracy per breakdown bin (length or lag), mean over seeds, one row per variant."""
    edges: set[tuple[int, int]] = set()
    cells: dict[tuple[str, tuple[int, int]], list[float]] = {}
    for r in runs:
        for b in r.get("bins", []):
            e = (math.floor(b["lo"]), math.floor(b["hi"]))
            edges.add(e)
            cells.setdefault((r["variant"], e), []).append(b["acc"])
    if not edges:
        return []
    cols = sorted(edges)
    lines = [f"Token accuracy by {key} (test split, mean over seeds):", "",
             "| model | " + " | ".join(f"{a}-{b}" for a, b in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for v in variants:
        row = [f"{statistics.fmean(cells[(v, e)]):.3f}" if (v, e) in cells else "-"
               for e in cols]
        lines.append(f"| {labels.get(v, v)} | " + " | ".join(row) + " |")
    return lines + [""]


# a study's name (``--study``) names a folder under results/<experiment>/studies/
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def results_markdown(summary: dict[str, Any]) -> str:
    """The RESULTS.md section of one experiment, from its summary."""
    labels: dict[str, str] = summary["labels"]
    metrics: list[str] = summary["metrics"]
    variants: list[str] = summary["variants"]
    paper: dict[str, dict[str, float]] = summary.get("paper", {})
    runs = summary["runs"]
    agg = aggregate(runs, metrics)
    smoke = " (SMOKE TEST: tiny budgets on CPU, not a result)" if summary.get("smoke") else ""
    study = summary.get("study")
    lines = [f"## {summary['title']}{smoke}" + (f": study `{study}`" if study else ""), "",
             (f"Measured {summary['started']} on {summary['environment']}, commit "
              f"`{summary['git_commit']}`. {summary['description']}"), ""]
    if study:
        changed = [f"budget {summary['budget']}",
                   *(f"`{o}`" for o in summary.get("overrides", []))]
        lines += [("A study beside the comparison, not its result: the runs below differ from "
                   f"it in their settings ({'; '.join(changed)}) or rates (column lr)."), ""]
    sweep = summary.get("sweep")
    if sweep:
        lines += [(f"Learning rate chosen per model on the validation split ("
                   f"{sweep['select_metric']}, {sweep['select_mode']}imised; sweep budget "
                   f"{sweep['budget']}, seed {sweep['seed']}):"), "",
                  "| model | " + " | ".join(f"lr {lr:g}" for lr in sweep["lrs"])
                  + " | chosen |", "|---|" + "---|" * (len(sweep["lrs"]) + 1)]
        # every model of the sweep, also one whose final runs are still to come
        diverged = {(r.get("variant"), f"{r.get('lr'):g}") for r in sweep.get("runs", [])
                    if r.get("diverged")}
        for v in [*variants, *(v for v in sweep["table"] if v not in variants)]:
            row = sweep["table"].get(v, {})
            cells = [f"{row[f'{lr:g}']:.4f}" if row.get(f"{lr:g}") is not None else
                     "not run" if f"{lr:g}" not in row else
                     "diverged" if (v, f"{lr:g}") in diverged else "failed"
                     for lr in sweep["lrs"]]
            lines.append(f"| {labels.get(v, v)} | " + " | ".join(cells)
                         + f" | {sweep['chosen'].get(v, '-')} |")
        lines.append("")
    head = ["model", "params (non-emb)", "lr"]
    for m in metrics:
        head += [f"{m} (mean ± std)", f"{m} 95% CI"]
        if any(m in paper.get(v, {}) for v in variants):
            head.append(f"{m} paper")
    head += ["seeds", "train time per run"]
    lines += [f"Final runs: budget {summary['budget']}; test split: {summary['test_split']}.",
              "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        cells = [labels.get(v, v), f"{rs[0].get('params_non_embedding', 0) / 1e6:.2f}M",
                 f"{rs[0].get('lr', '-'):g}" if isinstance(rs[0].get("lr"), float) else "-"]
        for m in metrics:
            cells += [fmt_stat(agg[v][m]), fmt_ci(agg[v][m])]
            if any(m in paper.get(u, {}) for u in variants):
                p = paper.get(v, {}).get(m)
                cells.append(f"{p:g}" if p is not None else "-")
        cells.append(", ".join(f"s{r['seed']}" + ("" if r.get("metrics") else
                                                  " diverged" if r.get("diverged") else " failed")
                               + (" stopped" if r.get("stopped") else "") for r in rs))
        cells.append(", ".join(f"{r['train_seconds'] / 60:.1f}" for r in rs) + " min")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += final_val_loss(runs, variants, labels)
    per_seed = ["Per seed:", ""]
    for r in runs:
        vals = ", ".join(f"{m} {r['metrics'][m]:.4f}" for m in metrics
                         if r.get("metrics", {}).get(m) is not None) or "no result"
        per_seed.append(f"- {labels.get(r['variant'], r['variant'])} seed {r['seed']}: {vals} "
                        f"(step {r.get('step', '?')}, {r['train_seconds'] / 60:.1f} min)")
    lines += per_seed + [""]
    if summary.get("breakdown"):
        lines += bins_table(runs, variants, labels, summary["breakdown"])
    lines += dynamics_table(runs, variants, labels)
    lines += memory_tail_table(runs, variants, labels)
    failed = [r for r in runs if r.get("memory_tail_failed")]
    if failed:
        lines += ["Memory tail failed for: " + ", ".join(
            f"{labels.get(r['variant'], r['variant'])} seed {r['seed']} "
            f"(exit {r['memory_tail_failed']})" for r in failed) +
            " (logs: `seeds/logs/memtail-<model>-seed<seed>.log` in the call's runs.tar.gz)", ""]
    if summary.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in summary["plots"]), ""]
    lines += ["Rerun any row (one run's exact command is in `summary.json`, `runs[].command`):",
              "", "```", *summary["commands"], "```", ""]
    return "\n".join(lines)
