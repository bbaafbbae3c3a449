"""End to end on CPU (slow: real training processes): the GPU call script with ``--smoke``
(no wheel install): sweep and seeds in one call, then a seeds phase reading that call's choice,
through the publish step into results/ and RESULTS.md."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sessa_pt.experiments import publish as pub

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "sessa_pt" / "experiments" / "gpu_call.sh"


def _call(tmp: pathlib.Path, out: str, *args: str) -> pathlib.Path:
    env = {**os.environ, "WHEELS": "0", "PYTHON": sys.executable, "OUT": str(tmp / out),
           "WORK": str(tmp / "work"), "VARIANTS": "sessa_nofb", "TRAIN_MINUTES": "5"}
    (tmp / out).mkdir()
    proc = subprocess.run(["bash", str(SCRIPT), "lm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / out


@pytest.mark.slow
def test_lm_gpu_call_sweep_then_seeds_on_cpu(tmp_path: pathlib.Path) -> None:
    # PHASE=all, as on the GPU: the sweep, then the seeds at its choice, in one call
    sweep = _call(tmp_path, "sweep", "all", "--smoke", "--lrs", "1e-3,3e-3", "--seeds", "1")
    assert {p.name for p in sweep.iterdir()} == {"choice.json", "summary.json", "RESULTS.md",
                                                 "runs.tar.gz", "call.txt"}
    choice = json.loads((sweep / "choice.json").read_text())
    assert set(choice["chosen"]) == {"sessa_nofb"} and choice["split"] == "valid"
    first = json.loads((sweep / "summary.json").read_text())["runs"]
    assert [(r["seed"], r["lr"]) for r in first] == [(1, choice["chosen"]["sessa_nofb"])]
    # a seeds-only call on another machine, from that call's choice.json
    seeds = _call(tmp_path, "seeds", "seeds", "--smoke", "--seeds", "1,2", "--choice",
                  str(sweep / "choice.json"))
    files = {p.name for p in seeds.iterdir()}
    assert {"summary.json", "RESULTS.md", "runs.tar.gz", "call.txt"} <= files
    assert len(files) <= 8
    summary = json.loads((seeds / "summary.json").read_text())
    runs = summary["runs"]
    assert [r["seed"] for r in runs] == [1, 2]
    assert all(r["lr"] == choice["chosen"]["sessa_nofb"] for r in runs)
    assert all(set(r["metrics"]) == {"ppl", "top1", "top5", "loss"} for r in runs)
    assert all(r["train_seconds"] > 0 and "sessa_pt.train" in r["command"] for r in runs)
    assert all(r["memory_tail"] for r in runs)
    assert all(r["dynamics"]["max_grad_norm"] > 0 for r in runs)       # the stability table
    assert "Training stability per run" in (seeds / "RESULTS.md").read_text()
    # The seeds' evaluation is on the held-out source.
    assert all("heldout/valid/manifest.json" in c for c in summary["commands"]
               if "eval.cli ppl" in c)
    root = tmp_path / "repo"
    root.mkdir()
    dest = pub.publish("lm_table2", seeds, root)
    assert (dest / "summary.json").is_file()
    assert "Sessa without feedback" in (root / "RESULTS.md").read_text()


@pytest.mark.slow
def test_symbolsoup_all_in_process_on_cpu(tmp_path: pathlib.Path) -> None:
    """The tuned SymbolSoup path end to end: task shards (sessa-data symbolsoup), a 2-rate
    sweep, one seed at its choice, the class-token evaluation by length, the memory tail and
    RESULTS.md."""
    from sessa_pt.experiments.__main__ import main

    out = tmp_path / "o"
    assert main(["symbolsoup", "all", "--smoke", "--out", str(out), "--variants", "sessa",
                 "--lrs", "1e-3,3e-3", "--seeds", "1", "--gpus", "0", "--runs-per-gpu",
                 "2"]) == 0
    choice = json.loads((out / "sweep" / "choice.json").read_text())
    assert set(choice["table"]["sessa"]) == {"0.001", "0.003"}
    summary = json.loads((out / "seeds" / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["lr"] == choice["chosen"]["sessa"] and 0.0 <= run["metrics"]["token_acc"] <= 1.0
    assert run["bins"] and run["memory_tail"] and run["oom_retries"] == 0
    text = (out / "seeds" / "RESULTS.md").read_text()
    assert "SMOKE TEST" in text and "Token accuracy by length" in text
