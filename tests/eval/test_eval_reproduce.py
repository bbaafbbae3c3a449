"""The SymbolSoup reproduction driver: its plan (dry run), and the full CPU smoke run (shards,
3 models x 2 seeds x 2 steps, evaluation, report, RESULTS.md; ~1 min on 2 cores)."""

from __future__ import annotations

import pathlib

import pytest

from sessa_pt.eval import reproduce_symbolsoup as rep


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


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path: pathlib.Path) -> None:
    assert rep.main(["--smoke", "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "RESULTS.md").read_text()
    assert "SMOKE TEST" in text and "0.8601 ± 0.0016" in text
    assert text.count("sessa_pt.train recipes/symbolsoup/") == 6
    assert (tmp_path / "o" / "report" / "report.md").is_file()
