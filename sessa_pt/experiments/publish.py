"""Bring one GPU call's files into the repository: ``python -m sessa_pt.experiments.publish
NAME DIR`` (NAME: symbolsoup600, symbolsoup2048, mqar_diffuse, lm_table2; DIR: the folder the
call's ``$OUT`` files came back to, from ``sessa_pt/experiments/gpu_call.sh``).

- a sweep's ``choice.json`` -> ``results/NAME/choice.json`` (the seeds call reads it there);
  a sweep of some models (``VARIANTS=...``) replaces only their rows and choices there;
- a seeds call's ``summary.json``, ``report.md`` and PNGs -> ``results/NAME/``. The report
  and PNGs are taken from DIR, else from ``seeds/report/`` inside the call's ``runs.tar.gz``;
  where that has no plots (a GPU image without matplotlib), the report is rebuilt here from
  the mlflow store inside the tarball. A call that ran only some models (``VARIANTS=sessa``)
  adds its runs to the summary already there (its report files get a ``<models>-`` prefix);
- a study (``python -m sessa_pt.experiments ... seeds --study STUDY``: the comparison's runs
  with other settings) goes to ``results/NAME/studies/STUDY/`` and its own RESULTS.md section
  ``NAME/STUDY``; the comparison's summary and table stay as they are;
- ``results/NAME/RESULTS.md`` is rewritten from the summary (plot paths pointing into
  ``results/NAME/``), and the top-level ``RESULTS.md`` gets it between the markers
  ``<!-- experiment:NAME -->`` and ``<!-- /experiment:NAME -->`` (appended the first time).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Any

from sessa_pt.experiments import results as res
from sessa_pt.experiments.runner import ROOT

NAMES = ("symbolsoup600", "symbolsoup2048", "mqar_diffuse", "lm_table2")


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the marked section of ``name`` replaced by ``body`` (appended if absent)."""
    start, end = f"<!-- experiment:{name} -->", f"<!-- /experiment:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def _joined(old: dict, new: dict, key: str, old_kept: bool) -> str:
    """Both calls' ``key`` (budget, commit, date) where rows of both remain, else the new one."""
    parts = [old.get(key, "")] * old_kept + [new.get(key, "")]
    return "; ".join(dict.fromkeys(p for p in parts if p))


def _seed_dir(variant: str, seed: Any) -> re.Pattern[str]:
    """A command that names the run directory of ``variant``'s ``seed`` (``.../sessa-seed2``)."""
    return re.compile(rf"/{re.escape(variant)}-seed{seed}(?![0-9])")


def merge_summaries(old: dict, new: dict) -> dict:
    """``new`` with ``old``'s other runs kept: a seeds phase split over several calls
    (``VARIANTS=sessa``, then ``transformer``, ...; or one lost seed again, ``--seeds 2``) adds
    up to one table. A (model, seed) that ``new`` ran replaces its old run."""
    if not old:
        return new
    ran = {(r["variant"], r["seed"]) for r in new["runs"]}
    kept = [r for r in old.get("runs", []) if (r["variant"], r["seed"]) not in ran]
    order = [*old.get("variants", []), *(v for v in new["variants"]
                                          if v not in old.get("variants", []))]
    runs = sorted(kept + new["runs"], key=lambda r: (order.index(r["variant"]), r["seed"]))
    # the old call's commands, less those of the runs made again now (their run directories
    # name them) and less the lines the new call repeats (cd, notes, the report)
    fresh = new.get("commands", [])
    again = [_seed_dir(v, s) for v, s in ran]
    commands = [c for c in old.get("commands", [])
                if c not in fresh and not any(p.search(c) for p in again)] + fresh
    return {**new, "variants": order, "runs": runs, "commands": commands,
            **{k: _joined(old, new, k, bool(kept)) for k in ("started", "git_commit", "budget")},
            "aggregate": res.aggregate(runs, list(new["metrics"]))}


def merge_choices(old: dict, new: dict) -> dict:
    """``new`` sweep with ``old``'s other models kept: a sweep rerun for some models
    (``VARIANTS=sessa``, or wider ``--lrs``) replaces those models' rows and choices only.
    The rates become the union; a model's row holds only the rates it ran."""
    if not old or old.get("experiment") != new.get("experiment"):
        return new
    ran = set(new.get("table", {}))
    keep = [v for v in old.get("table", {}) if v not in ran]
    kept_lrs = {float(lr) for v in keep for lr in old["table"][v]}
    return {**new, "lrs": sorted(kept_lrs | set(new.get("lrs", []))),
            "table": {**{v: old["table"][v] for v in keep}, **new.get("table", {})},
            "chosen": {**{v: old["chosen"][v] for v in keep if v in old.get("chosen", {})},
                       **new.get("chosen", {})},
            "runs": [r for r in old.get("runs", []) if r.get("variant") in keep]
            + new.get("runs", []),
            **{k: _joined(old, new, k, bool(keep)) for k in ("budget", "git_commit")}}


def _check_rates(summary: dict, choice: dict) -> None:
    """Every final run trained at its model's chosen rate, or the table would misattribute."""
    for r in summary.get("runs", []):
        want = choice.get("chosen", {}).get(r["variant"])
        if want is not None and not math.isclose(r["lr"], want, rel_tol=1e-9):
            raise SystemExit(
                f"{r['variant']} seed {r.get('seed')} trained at lr {r['lr']:g}, but "
                f"results/{summary['experiment']}/choice.json chose {want:g}: publish the "
                "sweep that chose that rate first, or rerun the seeds at the chosen rate")


def _report_from_tarball(tarball: pathlib.Path, name: str, dest: pathlib.Path,
                         prefix: str) -> None:
    """The seeds phase's comparison report out of the call's ``runs.tar.gz`` (its layout:
    ``driver.log``, ``sweep/``, ``seeds/`` with ``seeds/report/`` and the mlflow store
    ``seeds/mlruns`` or ``seeds/mlflow.db``). The report made on the GPU is taken as it is;
    where it has no plots (an image without matplotlib) it is rebuilt here from the store."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as made:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        seeds = pathlib.Path(tmp) / "seeds"
        report = seeds / "report"
        if not list(report.glob("*.png")):
            # The GPU image's mlflow-skinny has no SQLAlchemy: its store is a file store.
            uri = f"sqlite:///{seeds}/mlflow.db" if (seeds / "mlflow.db").is_file() else \
                (seeds / "mlruns").as_uri()
            cmd = [sys.executable, "-m", "sessa_pt.eval.report", "--tracking-uri", uri,
                   "--experiment", f"{name}-seeds", "--out", made, "--no-log",
                   "--include-stopped"]
            if subprocess.run(cmd, cwd=ROOT, check=False).returncode:
                print("[publish] the comparison report failed; RESULTS.md keeps its tables",
                      file=sys.stderr)
            report = pathlib.Path(made)
        for f in [*report.glob("*.png"), report / "report.md"]:
            if f.is_file():
                shutil.copy2(f, dest / f"{prefix}{f.name}")


def publish(name: str, src: pathlib.Path, root: pathlib.Path = ROOT) -> pathlib.Path:
    if name not in NAMES:
        raise SystemExit(f"unknown experiment {name!r}: choose from {', '.join(NAMES)}")
    dest = root / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "choice.json").is_file():
        old_choice = json.loads((dest / "choice.json").read_text()) \
            if (dest / "choice.json").is_file() else {}
        res.write_summary(dest / "choice.json", merge_choices(
            old_choice, json.loads((src / "choice.json").read_text())))
        print(f"[publish] {dest / 'choice.json'}: the seeds call reads it")
    if not (src / "summary.json").is_file():
        if not (src / "choice.json").is_file():
            raise SystemExit(f"{src} has neither summary.json nor choice.json: is it the "
                             "folder a gpu_call.sh call's files came back to?")
        return dest
    new = json.loads((src / "summary.json").read_text())
    choice_file = dest / "choice.json"
    section = name
    if new.get("study"):        # its own folder and section; the comparison stays as it is
        if not res.STUDY_NAME.fullmatch(new["study"]):
            raise SystemExit(f"{src / 'summary.json'}: study {new['study']!r} cannot name a "
                             "folder (letters, digits, '_' and '-')")
        section = f"{name}/{new['study']}"
        dest = dest / "studies" / new["study"]
        dest.mkdir(parents=True, exist_ok=True)
    old = json.loads((dest / "summary.json").read_text()) if (dest / "summary.json").is_file() \
        else {}
    summary = merge_summaries(old, new)
    # a study may train at other rates than the sweep chose: its runs say which
    if not new.get("study") and choice_file.is_file():
        # the published sweep, not whatever sweep the GPU machine last held: a seeds call
        # given --lr, or a sweep published in parts, still shows the sweep behind its rates
        choice = json.loads(choice_file.read_text())
        _check_rates(summary, choice)
        if "table" in choice:            # a sweep's choice, not a hand-written {"chosen": ...}
            summary["sweep"] = choice
    # A call that ran some of the models keeps its report apart: <models>-<file>.
    every = set(new.get("all_variants") or new["variants"]) | set(summary["variants"])
    prefix = "" if set(new["variants"]) >= every else "-".join(new["variants"]) + "-"
    for f in [*src.glob("*.png"), src / "report.md"]:
        if f.is_file():
            shutil.copy2(f, dest / f"{prefix}{f.name}")
    if not list(src.glob("*.png")) and (src / "runs.tar.gz").is_file():
        _report_from_tarball(src / "runs.tar.gz", name, dest, prefix)
    summary["plots"] = sorted(str(p.relative_to(root)) for p in dest.glob("*.png"))
    res.write_summary(dest / "summary.json", summary)
    body = res.results_markdown(summary)
    (dest / "RESULTS.md").write_text(body)
    top = root / "RESULTS.md"
    top.write_text(replace_section(top.read_text() if top.is_file() else "# Results\n",
                                   section, body))
    print(f"[publish] {dest}/summary.json, {dest}/RESULTS.md and the section in {top}")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sessa_pt.experiments.publish",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=NAMES)
    p.add_argument("src", help="the folder with the GPU call's files")
    args = p.parse_args(argv)
    publish(args.name, pathlib.Path(args.src))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
