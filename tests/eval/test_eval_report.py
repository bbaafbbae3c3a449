"""The comparison report on a local mlflow store with runs logged here through mlflow itself:
grouping, mean ± std over seeds, plots, and the report logged back as its own run."""

from __future__ import annotations

import json
import pathlib

import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sessa_pt.eval import report


def _log_run(name: str, seed: int, acc: float, final_loss: float, beta: float) -> str:
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({"run.name": name, "run.seed": seed, "model.mixer": name.split("-")[-1],
                           "params_non_embedding": 2_000_000, "flops_per_token_fwd": 9.0e6})
        m = []
        for step in range(1, 31):
            m += [Metric("loss", final_loss + 3.0 / step, 0, step),
                  Metric("tokens", 1000 * step, 0, step)]
        m += [Metric("val_loss", final_loss + 0.1, 0, 30), Metric("val_ppl", 2.0, 0, 30),
              Metric("symbolsoup_test_acc", acc, 0, 30),
              Metric("memtail_beta_model", beta, 0, 30)]
        m += [Metric("symbolsoup_test_acc_by_length", a, 0, length)
              for length, a in ((450, acc - 0.05), (550, acc + 0.05))]
        m += [Metric("memtail_influence_model", lag ** -beta, 0, lag) for lag in (1, 4, 16, 64)]
        MlflowClient().log_batch(run.info.run_id, metrics=m)
        return run.info.run_id


def test_report_from_mlflow(tmp_path: pathlib.Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cmp")
    _log_run("ss-sessa", 1, 0.80, 1.0, 0.5)
    _log_run("ss-sessa", 2, 0.90, 1.2, 0.7)
    # a second store, of the file kind the trainer uses where only mlflow-skinny is installed
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    other_uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(other_uri)
    mlflow.set_experiment("cmp")
    _log_run("ss-transformer", 1, 0.70, 1.5, 1.0)
    mlflow.set_tracking_uri("")

    out = tmp_path / "report"
    assert report.main(["--tracking-uri", uri, "--uri", other_uri, "--experiment", "cmp",
                        "--out", str(out), "--final-window", "10"]) == 0
    md = (out / "report.md").read_text()
    assert "| `ss-sessa` | 2 |" in md and "| `ss-transformer` | 1 |" in md
    assert "0.8500 ± 0.0707" in md                  # accuracy over the two seeds
    final = [1.0 + 3.0 / s for s in range(21, 31)]
    f1, f2 = sum(final) / 10, sum(f + 0.2 for f in final) / 10
    assert f"{(f1 + f2) / 2:.4f} ± {abs(f2 - f1) / 2 ** 0.5:.4f}" in md
    assert "0.7000" in md and "2M" in md and "30k" in md
    for png in ("loss_vs_tokens.png", "accuracy_vs_length.png", "influence_vs_lag.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    data = json.loads((out / "report.json").read_text())
    sessa = next(g for g in data["groups"] if g["group"] == "ss-sessa")
    assert sessa["symbolsoup_test_acc"][0] == pytest.approx(0.85)
    assert sessa["seeds"] == ["1", "2"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id], "tags.`sessa_pt.report` = 'true'")
    assert len(runs) == 1 and runs[0].info.run_name == "report"
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "loss_vs_tokens.png", "influence_vs_lag.png"} <= arts

    # a second report skips the first report run and groups by a parameter
    assert report.main(["--tracking-uri", uri, "--experiment", "cmp", "--out",
                        str(tmp_path / "r2"), "--group-by", "model.mixer", "--no-log"]) == 0
    md2 = (tmp_path / "r2" / "report.md").read_text()
    assert "| `sessa` | 2 |" in md2 and "report" not in md2.split("Runs:")[1]


def test_runs_stopped_at_a_budget_only_with_include_stopped(tmp_path: pathlib.Path) -> None:
    """The trainer ends a run that stopped on request (time budget, STOP, SIGTERM) as KILLED,
    a crashed one as FAILED: ``--include-stopped`` keeps the first kind only."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cmp")
    client = MlflowClient(uri)
    client.set_terminated(_log_run("ss-sessa", 1, 0.80, 1.0, 0.5), "KILLED")
    client.set_terminated(_log_run("ss-mamba2", 1, 0.10, 3.0, 1.5), "FAILED")
    mlflow.set_tracking_uri("")
    args = ["--tracking-uri", uri, "--experiment", "cmp", "--no-log"]
    assert report.main([*args, "--out", str(tmp_path / "r1")]) == 1     # nothing FINISHED
    assert report.main([*args, "--out", str(tmp_path / "r2"), "--include-stopped"]) == 0
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "| `ss-sessa` | 1 |" in md and "ss-mamba2" not in md


def test_report_without_runs(tmp_path: pathlib.Path) -> None:
    uri = f"sqlite:///{tmp_path}/empty.db"
    assert report.main(["--tracking-uri", uri, "--experiment", "none", "--out",
                        str(tmp_path / "r"), "--no-log"]) == 1
