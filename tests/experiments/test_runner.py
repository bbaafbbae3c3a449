"""The experiment runner with real (plain Python, no torch) subprocesses: slots run side by side,
results come back in order with exit codes and wall times, the STOP file is written at the time
budget and a job that ignores it is terminated."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

from sessa_pt.experiments.runner import Job, Runner, git_commit, gpu_slots

PY = sys.executable


def _job(code: str, log: pathlib.Path, stop: pathlib.Path | None = None) -> Job:
    return Job([PY, "-c", code], log=log, stop_file=stop, name=log.stem)


def test_slots_are_round_robin_over_gpus() -> None:
    assert gpu_slots("0,1", 2) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "1", "0", "1")]
    assert gpu_slots(" ", 3) is None


def test_jobs_run_side_by_side_in_their_slots(tmp_path: pathlib.Path) -> None:
    runner = Runner(slots=gpu_slots("7", 3), poll_s=0.05)
    code = "import os, sys, time; time.sleep(1.0); print(os.environ['CUDA_VISIBLE_DEVICES']); " \
           "sys.exit({})"
    jobs = [_job(code.format(i), tmp_path / f"j{i}.log") for i in range(3)]
    t0 = time.time()
    res = runner.run_all(jobs)
    wall = time.time() - t0
    assert [r.code for r in res] == [0, 1, 2]            # in the order given
    assert all(r.seconds >= 1.0 for r in res)
    assert wall < 2.5, f"three 1-s jobs in three slots took {wall:.1f} s: not concurrent"
    assert all((tmp_path / f"j{i}.log").read_text().strip() == "7" for i in range(3))
    assert all(c.startswith("CUDA_VISIBLE_DEVICES=7 ") for c in runner.commands)


def test_more_jobs_than_slots_queue(tmp_path: pathlib.Path) -> None:
    runner = Runner(slots=gpu_slots("0", 2), poll_s=0.05)
    jobs = [_job("import time; time.sleep(0.6)", tmp_path / f"q{i}.log") for i in range(4)]
    t0 = time.time()
    assert [r.code for r in runner.run_all(jobs)] == [0] * 4
    assert time.time() - t0 >= 1.2                       # two rounds of two


def test_time_budget_writes_stop_then_terminates(tmp_path: pathlib.Path) -> None:
    stop_ok, stop_stuck = tmp_path / "ok" / "STOP", tmp_path / "stuck" / "STOP"
    honours = (f"import pathlib, time\nwhile not pathlib.Path({str(stop_ok)!r}).exists(): "
               "time.sleep(0.05)\n")
    ignores = "import time; time.sleep(60)"
    runner = Runner(slots=gpu_slots("0", 2), kill_after_s=0.5, poll_s=0.05)
    ok, stuck = runner.run_all([_job(honours, tmp_path / "ok.log", stop_ok),
                                _job(ignores, tmp_path / "stuck.log", stop_stuck)],
                               max_minutes=0.5 / 60)
    assert ok.code == 0 and ok.stopped and not ok.killed
    assert stop_stuck.exists() and stuck.stopped and stuck.killed and stuck.code != 0
    assert stuck.seconds < 10


def test_dry_run_records_and_runs_nothing(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    runner = Runner(dry_run=True)
    res = runner.run_all([Job([PY, "-c", f"open({str(marker)!r}, 'w')"])])
    assert res[0].code == 0 and not marker.exists()
    assert runner.run(["echo", "x y"]) == 0 and runner.commands[-1] == "echo 'x y'"


def test_git_commit_prefers_the_named_commit(tmp_path: pathlib.Path, monkeypatch) -> None:
    """A copied tree with a stale .git (the GPU machine's case) must report the commit the
    caller names, not the stale one; without the name, a real repository's HEAD."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("SESSA_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == head
    (tmp_path / "f").write_text("changed")
    assert git_commit(tmp_path) == head + "+dirty"
    monkeypatch.setenv("SESSA_GIT_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"



def test_out_of_memory_beside_others_runs_again_with_one_slot_fewer(
        tmp_path: pathlib.Path) -> None:
    """Three slots, four jobs: the second fails with torch's out-of-memory message on its first
    attempt while others run; it waits for one to end, then runs (and succeeds) with at most two
    jobs side by side from then on. A job that fails for another reason, or runs out of memory
    alone, is not retried."""
    flag, live = tmp_path / "attempted", tmp_path / "live"
    live.mkdir()
    track = (f"import os, pathlib, time, sys\nme = pathlib.Path({str(live)!r}) / str(os.getpid())"
             "\nme.touch()\nn = len(list(me.parent.iterdir()))\n"
             f"open({str(tmp_path / 'peak')!r}, 'a').write(f'{{n}}\\n')\n")
    oom_once = track + (f"f = pathlib.Path({str(flag)!r})\nif not f.exists():\n    f.touch()\n"
                        "    me.unlink()\n    print('torch.OutOfMemoryError: CUDA out of memory."
                        " Tried to allocate 38.00 MiB'); sys.exit(1)\n"
                        "time.sleep(0.3)\nme.unlink()\n")
    sleeper = track + "time.sleep(0.8)\nme.unlink()\n"
    runner = Runner(slots=gpu_slots("0", 3), poll_s=0.02)
    res = runner.run_all([_job(sleeper, tmp_path / "a.log"), _job(oom_once, tmp_path / "b.log"),
                          _job(sleeper, tmp_path / "c.log"), _job(sleeper, tmp_path / "d.log")])
    assert [r.code for r in res] == [0, 0, 0, 0]
    assert [r.oom_retries for r in res] == [0, 1, 0, 0]
    assert len(runner.commands) == 4                     # one per job: callers index them
    assert "CUDA out of memory" in (tmp_path / "b.log").read_text()   # the log keeps attempt 1
    peaks = [int(x) for x in (tmp_path / "peak").read_text().split()]
    assert len(peaks) == 5 and max(peaks[3:]) <= 2    # the retry and d: at most 2 at once
    runner = Runner(slots=gpu_slots("0", 2), poll_s=0.02)
    flag.unlink()
    (res,) = runner.run_all([_job(oom_once, tmp_path / "e.log")])       # alone: no retry
    assert (res.code, res.oom_retries) == (1, 0)
    # cuBLAS reports a full GPU as a failed handle allocation: the same retry
    flag.unlink()
    cublas_once = oom_once.replace("torch.OutOfMemoryError: CUDA out of memory.",
                                   "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                                   "calling `cublasCreate(handle)`")
    res = runner.run_all([_job(sleeper, tmp_path / "h.log"), _job(cublas_once, tmp_path / "i.log")])
    assert [(r.code, r.oom_retries) for r in res] == [(0, 0), (0, 1)]
    other = "import sys; print('some other error'); sys.exit(3)"
    res = runner.run_all([_job(sleeper, tmp_path / "f.log"), _job(other, tmp_path / "g.log")])
    assert [(r.code, r.oom_retries) for r in res] == [(0, 0), (3, 0)]
