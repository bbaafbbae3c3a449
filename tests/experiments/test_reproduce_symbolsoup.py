"""The SymbolSoup reproduction driver (``sessa_pt.experiments.reproduce_symbolsoup``): its plan
(dry run), and the full CPU smoke run (shards, 3 models x 2 seeds x 2 steps, evaluation, report,
RESULTS.md; ~1 min on 2 cores)."""

from __future__ import annotations

import json
import pathlib

import pytest

from sessa_pt.experiments import reproduce_symbolsoup as rep


def test_dry_run_plan(tmp_path: pathlib.Path, capsys) -> None:
    assert rep.main(["--dry-run", "--out", str(tmp_path / "o"), "--data",
                     str(tmp_path / "d"), "--max-minutes-per-run", "6"]) == 0
    out = capsys.readouterr().out
    cmds = [ln[2:] for ln in out.splitlines() if ln.startswith("$ ")]
    assert "symbolsoup" in cmds[0] and "--min-len 400 --max-len 600" in cmds[0]
    train = [c for c in cmds if "sessa_pt.train" in c]
    assert len(train) == 6
    for v in rep.VARIANTS:
        for s in (1, 2):
            assert any(f"recipes/symbolsoup/{v}.yaml run.seed={s} " in c for c in train)
    evals = [c for c in cmds if "sessa_pt.eval.cli task" in c]
    assert len(evals) == 6 and all("test/manifest.json" in c for c in evals)
    assert "sessa_pt.eval.report" in cmds[-1]
    assert not (tmp_path / "o").exists()


def test_dry_run_2048(tmp_path: pathlib.Path, capsys) -> None:
    assert rep.main(["--dry-run", "--length", "2048", "--out", str(tmp_path / "o"),
                     "--data", str(tmp_path / "d"), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "--max-len 2048" in out and "recipes/symbolsoup2048/mamba2.yaml" in out


def test_dry_run_concurrent_slots(tmp_path: pathlib.Path, capsys) -> None:
    """--gpus/--runs-per-gpu spread the six runs over the GPUs, round robin, with one log each."""
    assert rep.main(["--dry-run", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
                     "--gpus", "2,3", "--runs-per-gpu", "3"]) == 0
    cmds = [ln[2:] for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    train = [c for c in cmds if "sessa_pt.train" in c]
    assert [c.split()[0] for c in train] == ["CUDA_VISIBLE_DEVICES=2", "CUDA_VISIBLE_DEVICES=3"] * 3
    assert all(c.startswith("CUDA_VISIBLE_DEVICES=") for c in cmds if "eval.cli task" in c)
    assert rep.gpu_slots("", 2) is None


def test_dry_run_sweep_settings(tmp_path: pathlib.Path, capsys) -> None:
    """--setting: each variant and seed once per setting, in its own directory and mlflow run
    name, with the setting's overrides last (they win over the common ones)."""
    out = tmp_path / "o"
    assert rep.main(["--dry-run", "--out", str(out), "--data", str(tmp_path / "d"), "--seeds",
                     "1", "--variants", "sessa,transformer", "--setting",
                     "lr5e-4:optim.lr=5e-4 optim.min_lr=5e-5", "--setting",
                     "w0.1:data.context_loss_weight=0.1", "train.log_every=7"]) == 0
    cmds = [ln[2:] for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    train = [c for c in cmds if "sessa_pt.train" in c]
    assert len(train) == 4
    first = train[0].split()
    assert f"run.dir={out}/runs/lr5e-4/sessa-seed1" in first
    assert first[-3:] == ["optim.lr=5e-4", "optim.min_lr=5e-5", "run.name=symbolsoup-sessa-lr5e-4"]
    assert first.index("train.log_every=7") < first.index("optim.lr=5e-4")
    assert any(f"run.dir={out}/runs/w0.1/transformer-seed1" in c
               and "data.context_loss_weight=0.1" in c for c in train)
    evals = [c for c in cmds if "sessa_pt.eval.cli task" in c]
    assert any(f"--json {out}/eval/w0.1/sessa-seed1.json" in c for c in evals)


@pytest.mark.parametrize("spec,message", [("lr", "write NAME:key=value"),
                                          ("a b:x=1", "write NAME:key=value"),
                                          ("lr:optim.lr", "not a key=value override")])
def test_bad_settings_say_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        rep.parse_settings([spec])
    with pytest.raises(SystemExit, match="given twice"):
        rep.parse_settings(["a:x=1", "a:x=2"])


def test_results_table_has_a_row_per_setting_and_model(tmp_path: pathlib.Path) -> None:
    runs = [{"variant": v, "seed": seed, "setting": st, "seconds": 60.0, "stopped": False,
             "summary": {"step": 10, "state": "finished"},
             "eval": {"token_acc": acc + seed / 100, "bins": [{"lo": 400, "hi": 500,
                                                               "acc": acc}]}}
            for st, v, acc in [("lrA", "sessa", 0.5), ("lrA", "transformer", 0.4),
                               ("lrB", "sessa", 0.1)] for seed in (1, 2)]
    args = rep.build_parser().parse_args(["--seeds", "1,2"])
    text = rep.results_markdown(args, "symbolsoup", 400, 600, runs, ["cmd"],
                                rep.datetime.datetime(2026, 11, 28), "sqlite:///x", None)
    assert "| setting | model | params (non-emb) |" in text
    assert "| lrA | Sessa | " in text and "| 0.5150 ± 0.0071 |" in text
    assert "| lrB | Sessa | " in text and "| 0.1150 ± 0.0071 |" in text
    assert "| lrA | Transformer | 0.400 |" in text


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "o"
    assert rep.main(["--smoke", "--out", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "SMOKE TEST" in text
    assert text.count("sessa_pt.train recipes/symbolsoup/") == 6
    assert (out / "report" / "report.md").is_file()
    # Each model's row carries the mean ± std of the accuracies its evaluations measured.
    for variant, label in rep.LABEL.items():
        accs = [json.loads((out / "eval" / f"{variant}-seed{s}.json").read_text())["token_acc"]
                for s in (1, 2)]
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
        assert f"| {rep._ms(accs)} |" in row, (row, accs)
        assert all(f"s{s}: {a:.4f}" in row for s, a in zip((1, 2), accs, strict=True))
