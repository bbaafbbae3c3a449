"""Publishing a GPU call's files into results/ and the marked RESULTS.md section."""

from __future__ import annotations

import json
import pathlib
import tarfile

import pytest

from sessa_pt.experiments import publish as pub
from tests.experiments.test_results import _summary


def test_replace_section_appends_then_replaces() -> None:
    once = pub.replace_section("# Results\n\nintro\n", "mqar_diffuse", "first")
    assert once.endswith("<!-- experiment:mqar_diffuse -->\nfirst\n"
                         "<!-- /experiment:mqar_diffuse -->\n")
    twice = pub.replace_section(once + "\ntail\n", "mqar_diffuse", "second")
    assert "first" not in twice and "second" in twice and twice.endswith("tail\n")
    assert twice.startswith("# Results\n\nintro\n")


def test_publish_seeds_and_sweep(tmp_path: pathlib.Path) -> None:
    src, root = tmp_path / "out", tmp_path / "repo"
    src.mkdir()
    root.mkdir()
    (root / "RESULTS.md").write_text("# Results\n")
    (src / "summary.json").write_text(json.dumps(_summary()))
    (src / "choice.json").write_text(json.dumps({"chosen": {"sessa": 1e-3}}))
    (src / "loss_vs_tokens.png").write_bytes(b"png")
    dest = pub.publish("mqar_diffuse", src, root)
    assert json.loads((dest / "choice.json").read_text())["chosen"] == {"sessa": 1e-3}
    assert (dest / "loss_vs_tokens.png").read_bytes() == b"png"
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["plots"] == ["results/mqar_diffuse/loss_vs_tokens.png"]
    top = (root / "RESULTS.md").read_text()
    assert "<!-- experiment:mqar_diffuse -->" in top and "| 0.6000 ± 0.1000 |" in top
    assert (dest / "RESULTS.md").read_text() in top
    with pytest.raises(SystemExit, match="neither summary.json nor choice.json"):
        pub.publish("mqar_diffuse", tmp_path / "empty", root)


def test_a_study_is_published_apart(tmp_path: pathlib.Path) -> None:
    """A seeds call with --study lands in results/NAME/studies/STUDY and its own section; the
    comparison's summary and section are left alone, and its rates are not checked against
    the sweep's choice (a study may set them)."""
    root = tmp_path / "repo"
    (root / "results" / "symbolsoup600").mkdir(parents=True)
    (root / "RESULTS.md").write_text("# Results\n")
    main_src, study_src = tmp_path / "main", tmp_path / "study"
    for src in (main_src, study_src):
        src.mkdir()
    (main_src / "summary.json").write_text(json.dumps(_summary()))
    pub.publish("symbolsoup600", main_src, root)
    comparison = (root / "results" / "symbolsoup600" / "summary.json").read_text()
    (root / "results" / "symbolsoup600" / "choice.json").write_text(
        json.dumps({"chosen": {"sessa": 9e-9}}))
    study = {**_summary(), "study": "warmup450", "overrides": ["optim.grad_clip=10"],
             "runs": [dict(r, metrics={"token_acc": 0.9}) for r in _summary()["runs"]]}
    (study_src / "summary.json").write_text(json.dumps(study))
    dest = pub.publish("symbolsoup600", study_src, root)
    assert dest == root / "results" / "symbolsoup600" / "studies" / "warmup450"
    assert (root / "results" / "symbolsoup600" / "summary.json").read_text() == comparison
    top = (root / "RESULTS.md").read_text()
    assert "<!-- experiment:symbolsoup600 -->" in top
    assert "<!-- experiment:symbolsoup600/warmup450 -->" in top
    body = (dest / "RESULTS.md").read_text()
    assert ": study `warmup450`" in body and "`optim.grad_clip=10`" in body
    assert "| 0.9000 ± 0.0000 |" in body and "| 0.9000 ± 0.0000 |" not in \
        top.split("<!-- experiment:symbolsoup600/warmup450 -->")[0]
    bad = {**study, "study": "../x"}
    (study_src / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="cannot name a folder"):
        pub.publish("symbolsoup600", study_src, root)


def test_calls_split_by_model_add_up(tmp_path: pathlib.Path) -> None:
    """VARIANTS=sessa, then VARIANTS=transformer: one summary with both; a rerun of a model
    replaces its old runs; the partial calls' plots are kept apart."""
    root = tmp_path / "repo"
    root.mkdir()
    full = _summary()
    for i, variant in enumerate(["sessa", "transformer", "sessa"]):
        src = tmp_path / f"call{i}"
        src.mkdir()
        part = {**full, "variants": [variant], "all_variants": full["variants"],
                "runs": [dict(r, metrics={"token_acc": r["metrics"]["token_acc"] + i})
                         for r in full["runs"] if r["variant"] == variant]}
        (src / "summary.json").write_text(json.dumps(part))
        (src / "accuracy_vs_length.png").write_bytes(b"png")
        pub.publish("symbolsoup600", src, root)
    merged = json.loads((root / "results" / "symbolsoup600" / "summary.json").read_text())
    assert merged["variants"] == ["sessa", "transformer"]
    sessa = [r["metrics"]["token_acc"] for r in merged["runs"] if r["variant"] == "sessa"]
    assert sessa == pytest.approx([2.5, 2.6, 2.7])                 # the third call's
    assert len([r for r in merged["runs"] if r["variant"] == "transformer"]) == 3
    assert merged["aggregate"]["transformer"]["token_acc"]["mean"] == pytest.approx(1.4)
    assert set(merged["plots"]) == {"results/symbolsoup600/sessa-accuracy_vs_length.png",
                                    "results/symbolsoup600/transformer-accuracy_vs_length.png"}


def _call_out(tmp_path: pathlib.Path, with_report: bool) -> pathlib.Path:
    """A seeds call's $OUT as gpu_call.sh leaves it: summary.json, and runs.tar.gz holding
    driver.log, seeds/report/ (when the GPU made the report) and the file store seeds/mlruns
    with one finished run."""
    import mlflow

    work, src = tmp_path / "work", tmp_path / "out"
    (work / "seeds" / "report").mkdir(parents=True)
    src.mkdir()
    (work / "driver.log").write_text("log")
    if with_report:
        (work / "seeds" / "report" / "loss_vs_tokens.png").write_bytes(b"gpu png")
        (work / "seeds" / "report" / "report.md").write_text("gpu report")
    client = mlflow.tracking.MlflowClient((work / "seeds" / "mlruns").as_uri())
    run = client.create_run(client.create_experiment("mqar_diffuse-seeds"),
                            run_name="mqar_diffuse-sessa")
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 3.0 - step, step=step)
        client.log_metric(run.info.run_id, "tokens", 1000.0 * step, step=step)
    client.set_terminated(run.info.run_id, "FINISHED")
    with tarfile.open(src / "runs.tar.gz", "w:gz") as tar:
        for entry in ("driver.log", "seeds"):
            tar.add(work / entry, arcname=entry)
    (src / "summary.json").write_text(json.dumps(_summary()))
    return src


def test_report_comes_from_the_call_tarball(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path / "repo"
    root.mkdir()
    dest = pub.publish("mqar_diffuse", _call_out(tmp_path / "a", with_report=True), root)
    assert (dest / "loss_vs_tokens.png").read_bytes() == b"gpu png"
    assert (dest / "report.md").read_text() == "gpu report"
    # No report made on the GPU: rebuilt here from the tarball's mlflow store.
    root2 = tmp_path / "repo2"
    root2.mkdir()
    dest = pub.publish("mqar_diffuse", _call_out(tmp_path / "b", with_report=False), root2)
    assert "mqar_diffuse-sessa" in (dest / "report.md").read_text()
    assert (dest / "loss_vs_tokens.png").stat().st_size > 1000
    assert json.loads((dest / "summary.json").read_text())["plots"] == \
        ["results/mqar_diffuse/loss_vs_tokens.png"]


def test_merged_commands_drop_the_rerun_models() -> None:
    def call(variants, tag, seeds=(1,)):
        return {"variants": variants, "metrics": ["token_acc"], "git_commit": tag,
                "runs": [{"variant": v, "seed": s, "metrics": {"token_acc": 0.5}}
                         for v in variants for s in seeds],
                "commands": ["cd /repo"] + [f"train recipes/f/{v}.yaml run.dir=/o/runs/{v}-seed{s}"
                                            f" {tag}" for v in variants for s in seeds]
                + ["report"]}

    merged = pub.merge_summaries(call(["sessa", "sessa_nofb"], "old"), call(["sessa"], "new"))
    kept = "train recipes/f/sessa_nofb.yaml run.dir=/o/runs/sessa_nofb-seed1 old"
    assert merged["commands"] == [kept, "cd /repo",
                                  "train recipes/f/sessa.yaml run.dir=/o/runs/sessa-seed1 new",
                                  "report"]
    assert merged["git_commit"] == "old; new"              # rows of both calls remain
    again = pub.merge_summaries(merged, call(["sessa", "sessa_nofb"], "new"))
    assert again["commands"] == call(["sessa", "sessa_nofb"], "new")["commands"]
    assert again["git_commit"] == "new"


def test_one_seed_run_again_replaces_only_that_seed() -> None:
    """A seed lost to a crash, run again alone (``VARIANTS=sessa_nofb ... --seeds 2``), joins
    the model's other seeds; seed 1's command is not taken for seed 10's."""
    old = {"variants": ["sessa", "sessa_nofb"], "metrics": ["token_acc"], "git_commit": "a",
           "runs": [{"variant": v, "seed": s, "metrics": {"token_acc": 0.1 * s}}
                    for v in ("sessa", "sessa_nofb") for s in (1, 2, 10)],
           "commands": [f"train run.dir=/o/runs/sessa_nofb-seed{s}" for s in (1, 2, 10)]}
    new = {"variants": ["sessa_nofb"], "metrics": ["token_acc"], "git_commit": "b",
           "runs": [{"variant": "sessa_nofb", "seed": 2, "metrics": {"token_acc": 0.9}}],
           "commands": ["train run.dir=/o/runs/sessa_nofb-seed2 again"]}
    merged = pub.merge_summaries(old, new)
    assert [(r["variant"], r["seed"], r["metrics"]["token_acc"]) for r in merged["runs"]] == [
        ("sessa", 1, 0.1), ("sessa", 2, 0.2), ("sessa", 10, 1.0),
        ("sessa_nofb", 1, 0.1), ("sessa_nofb", 2, 0.9), ("sessa_nofb", 10, 1.0)]
    assert merged["commands"] == ["train run.dir=/o/runs/sessa_nofb-seed1",
                                  "train run.dir=/o/runs/sessa_nofb-seed10",
                                  "train run.dir=/o/runs/sessa_nofb-seed2 again"]
    assert merged["aggregate"]["sessa_nofb"]["token_acc"]["n"] == 3


def _choice(table: dict, budget: str, commit: str) -> dict:
    return {"experiment": "symbolsoup600", "select_metric": "token_acc", "select_mode": "max",
            "lrs": sorted({float(lr) for row in table.values() for lr in row}), "seed": 0,
            "budget": budget, "git_commit": commit, "table": table,
            "chosen": {v: max((float(k) for k, s in row.items() if s is not None),
                              key=lambda lr: row[f"{lr:g}"]) for v, row in table.items()},
            "runs": [{"variant": v, "lr": float(k)} for v, row in table.items() for k in row]}


def test_sweep_rerun_for_some_models_replaces_only_their_rows(tmp_path: pathlib.Path) -> None:
    """A first sweep of two models, one of whose runs failed, then a wider sweep of that model
    alone: the published choice keeps the other model's row and shows which rates it lacks;
    the seeds summary shows that merged sweep, and a run at another rate is refused."""
    root = tmp_path / "repo"
    root.mkdir()
    first = _choice({"sessa": {"0.00025": 0.2, "0.0005": None},
                     "transformer": {"0.00025": 0.3, "0.0005": 0.4}}, "500 steps", "aaa")
    second = _choice({"sessa": {"0.000125": 0.1, "0.00025": 0.18, "0.0005": 0.12}},
                     "500 steps", "bbb")
    for i, choice in enumerate([first, second]):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "choice.json").write_text(json.dumps(choice))
        pub.publish("symbolsoup600", tmp_path / f"c{i}", root)
    merged = json.loads((root / "results" / "symbolsoup600" / "choice.json").read_text())
    assert merged["lrs"] == [0.000125, 0.00025, 0.0005]
    assert merged["chosen"] == {"transformer": 0.0005, "sessa": 0.00025}
    assert merged["table"]["sessa"]["0.0005"] == 0.12 and merged["git_commit"] == "aaa; bbb"
    assert [r["lr"] for r in merged["runs"] if r["variant"] == "sessa"] == [
        0.000125, 0.00025, 0.0005]
    summary = _summary()                       # seeds of sessa and transformer
    summary["experiment"] = "symbolsoup600"
    for r in summary["runs"]:
        r["lr"] = merged["chosen"][r["variant"]]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "summary.json").write_text(json.dumps(summary))
    pub.publish("symbolsoup600", tmp_path / "s", root)
    text = (root / "results" / "symbolsoup600" / "RESULTS.md").read_text()
    assert "| 0.1000 | 0.1800 | 0.1200 | 0.00025 |" in text       # the rerun's sessa row
    assert "| not run | 0.3000 | 0.4000 | 0.0005 |" in text       # transformer never ran 1.25e-4
    summary["runs"][0]["lr"] = 1e-3
    (tmp_path / "s" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="chose 0.00025"):
        pub.publish("symbolsoup600", tmp_path / "s", root)
