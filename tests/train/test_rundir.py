"""Run-directory bookkeeping, resume-setting rules, spike detection and the tracking probe,
without launching a run (the launches are in tests/distributed/test_faults.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sessa_pt.config import load_config, to_dict
from sessa_pt.train.nonfinite import NonFinitePolicy, SpikeDetector
from sessa_pt.train.rundir import RunDir, RunDirError, strict_json
from sessa_pt.train.tracking import TrackingUnreachable, probe
from sessa_pt.train.trainer import config_changes


def _lock(path, pid, host=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "LOCK").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                           "started": "then"}))


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    _lock(tmp_path / "a", os.getppid())
    with pytest.raises(RunDirError, match=f"pid {os.getppid()} on host"):
        RunDir(tmp_path / "a", 0).prepare(resume=True, overwrite=False, has_checkpoints=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _lock(tmp_path / "b", int(dead))
    rd = RunDir(tmp_path / "b", 0)
    notes = rd.prepare(resume=True, overwrite=False, has_checkpoints=False)
    assert any("stale lock" in n for n in notes)
    assert json.loads((tmp_path / "b" / "LOCK").read_text())["pid"] == os.getpid()
    rd.release_lock()
    assert not (tmp_path / "b" / "LOCK").exists()


def test_start_over_is_refused_or_moves_the_old_dir_aside(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    with pytest.raises(RunDirError, match="run.overwrite=true"):
        RunDir(run, 0).prepare(resume=False, overwrite=False, has_checkpoints=True)
    notes = RunDir(run, 0).prepare(resume=False, overwrite=True, has_checkpoints=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000003").is_dir()
    assert str(aside[0]) in notes[0] and not (run / "checkpoints").exists()


def test_strict_json_and_first_error_wins(tmp_path):
    assert strict_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == \
        '{"a": null, "b": [null, 1.0]}'
    rd = RunDir(tmp_path, 1)
    assert rd.record_error(1, RuntimeError("boom"), 4, {"total_steps": 9})
    assert not RunDir(tmp_path, 0).record_error(0, RuntimeError("later"), 4, {})
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["failed_rank"] == 1
    assert "boom" in status["error"]
    assert (tmp_path / "error.txt").read_text().startswith("rank 1 failed after step 4")


def test_resume_setting_rules():
    old = to_dict(load_config("recipes/tiny/sessa.yaml", ["data.train=x"]))
    new = to_dict(load_config("recipes/tiny/sessa.yaml",
                              ["data.train=x", "optim.lr=1e-4", "train.steps=999",
                               "run.dir=elsewhere"]))
    safe, refused = config_changes(old, new)
    assert set(safe) == {"optim.lr", "train.steps"} and refused == []
    bad = to_dict(load_config("recipes/tiny/sessa.yaml",
                              ["data.train=y", "run.seed=5", "model.d_model=64"]))
    assert set(config_changes(old, bad)[1]) == {"data.train", "run.seed", "model.d_model"}


def test_spikes_and_nonfinite_counting():
    det = SpikeDetector(factor=3.0, window=10)
    assert [det.check(x) for x in (5.0, 5.0, 4.0, float("nan"), 4.0, 4.0)] == [None] * 6
    assert det.check(20.0) == pytest.approx(4.4)
    assert det.check(6.0) is None
    pol = NonFinitePolicy("abort", 2)
    for step, bad in enumerate([False, True, False, True, True], start=1):
        pol.update(step, bad)
    assert pol.should_abort() and pol.total == 3 and pol.last_finite_step == 3
    assert "steps 4-5" in pol.abort_message(5, 1e4)
    skip = NonFinitePolicy("skip", 1)
    skip.update(1, True)
    assert not skip.should_abort() and skip.last_bad


def test_probe_fails_fast_on_a_port_with_no_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable, match=f"http://127.0.0.1:{port}"):
        probe(f"http://127.0.0.1:{port}", 2.0)
    assert time.monotonic() - t0 < 5
    probe("sqlite:///nowhere.db", 2.0)       # local stores are not probed


def test_a_failure_while_the_trainer_is_built_is_recorded_and_frees_the_lock(tmp_path, capsys):
    from sessa_pt.train.trainer import report_failure

    rd = RunDir(tmp_path / "run", 0)
    rd.prepare(resume=True, overwrite=False, has_checkpoints=False)
    rd.ours = True                       # what Trainer._prepare sets on success
    assert report_failure(None, rd, RuntimeError("engine init blew up")) == 1
    assert "rank 0 failed: RuntimeError: engine init blew up" in capsys.readouterr().err
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "engine init" in status["error"]
    assert not (tmp_path / "run" / "LOCK").exists()
    # Someone else's live run dir is left alone.
    _lock(tmp_path / "other", os.getppid())
    other = RunDir(tmp_path / "other", 0)
    assert report_failure(None, other, ValueError("bad config")) == 2
    assert not (tmp_path / "other" / "status.json").exists()
