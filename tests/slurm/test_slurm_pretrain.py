"""slurm/pretrain.sh on a real single-node Slurm with the real trainer (tiny CPU recipe, 2
processes through srun + torchrun): a job completes with its checkpoint and mlflow run; a job
signalled mid-run checkpoints, requeues itself and finishes with the losses of an uninterrupted
run in the same mlflow run; a failing job ends non-zero with a readable error in its log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.slurm.conftest import LocalSlurm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny" / "sessa.yaml"
PRETRAIN = ROOT / "slurm" / "pretrain.sh"
STEPS = 48
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]   # the #SBATCH defaults are GPU


def overrides(data: dict, run_dir: Path | None) -> list[str]:
    kv = {**data, "train.steps": STEPS, "checkpoint.every": 16, "eval.every": 0,
          "eval.max_batches": 2, "data.num_workers": 0}
    if run_dir is not None:
        kv["run.dir"] = run_dir
    return [f"{k}={v}" for k, v in kv.items()]


def submit(slurm: LocalSlurm, log: Path, *args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """sbatch --wait in the background; its first stdout line is the job id (--parsable)."""
    return subprocess.Popen(["sbatch", "--wait", "--parsable", f"--output={log}", *CPU_JOB,
                             str(PRETRAIN), *args], cwd=cwd, env=slurm.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference_run(slurm: LocalSlurm, tiny_data: dict, tmp_path_factory) -> tuple[Path, Path, int]:
    """One uninterrupted job: (run dir, job log, sbatch exit code)."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir, log = tmp / "run", tmp / "job.out"
    job = submit(slurm, log, str(RECIPE), *overrides(tiny_data, run_dir))
    job.communicate(timeout=300)
    return run_dir, log, job.returncode


def test_pretrain_job_completes_with_checkpoint_and_mlflow_run(reference_run) -> None:
    run_dir, log, rc = reference_run
    text = log.read_text()
    assert rc == 0, text
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS, status
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert "2 proc/node" in text and "run finished" in text

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=status["tracking_uri"])
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == \
        list(range(1, STEPS + 1))


def test_signalled_job_requeues_and_resumes_like_an_uninterrupted_run(
        slurm: LocalSlurm, tiny_data: dict, reference_run, tmp_path: Path) -> None:
    ref_dir, _, ref_rc = reference_run
    assert ref_rc == 0
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, log, str(RECIPE), *overrides(tiny_data, run_dir))
    job_id = job.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), job_id

    # Signal the batch shell as Slurm would before the time limit (--signal=B:USR1@...), once
    # the trainer is a few steps in.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        train_log = run_dir / "train_log.jsonl"
        if train_log.exists() and len(train_log.read_text().splitlines()) >= 3:
            break
        assert job.poll() is None, f"job ended before it was signalled:\n{log.read_text()}"
        time.sleep(0.2)
    else:
        pytest.fail(f"the trainer did not reach step 3:\n{log.read_text()}")
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)

    # The first attempt stops with a checkpoint and requeues; keep its mlflow run id.
    first_id = None
    while time.monotonic() < deadline and job.poll() is None:
        status_file = run_dir / "status.json"
        if status_file.exists():
            status = json.loads(status_file.read_text())
            if status.get("state") == "stopped":
                first_id = status["mlflow_run_id"]
                stopped_at = status["step"]
                break
        time.sleep(0.2)
    _, err = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
    text = log.read_text()
    assert job.returncode == 0, f"{err}\n{text}"
    assert first_id, f"the job never reported 'stopped':\n{text}"
    assert 3 <= stopped_at < STEPS, text

    assert "got SIGUSR1" in text and f"requeueing job {job_id}" in text, text
    assert f"job {job_id} (restart 1)" in text, text          # the same job ran again
    assert slurm.final_record(job_id).get("JobState") == "COMPLETED"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS, status
    assert status["mlflow_run_id"] == first_id                 # resumed into the same mlflow run
    assert not (run_dir / "STOP").exists()
    assert losses(run_dir) == losses(ref_dir)                   # exact resume


@pytest.mark.parametrize("case", ["bad_override", "missing_recipe"])
def test_failing_job_exits_nonzero_with_readable_error(
        slurm: LocalSlurm, tiny_data: dict, tmp_path: Path, case: str) -> None:
    log = tmp_path / "job.out"
    if case == "bad_override":
        # Also: submitted from outside the checkout and without run.dir, so the script finds
        # the checkout from its own path and derives the run dir runs/<recipe>-<job id>.
        args = [str(RECIPE), *overrides(tiny_data, None), "train.stepz=5"]
        job = submit(slurm, log, *args, cwd=tmp_path)
        expect = "unknown key(s) train.stepz"
    else:
        args = ["recipes/tiny/no_such_recipe.yaml"]
        job = submit(slurm, log, *args)
        expect = "recipe file 'recipes/tiny/no_such_recipe.yaml' not found"
    out, _ = job.communicate(timeout=180)
    job_id = out.strip().split(";")[0]
    text = log.read_text()
    assert job.returncode != 0, text
    assert expect in text, text
    assert slurm.final_record(job_id).get("JobState") == "FAILED"
    if case == "bad_override":
        assert f"run dir {tmp_path}/runs/sessa-{job_id}" in text, text
        assert "training FAILED" in text


def test_outside_slurm_prints_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for script in ("pretrain.sh", "eval.sh"):
        r = subprocess.run(["bash", str(ROOT / "slurm" / script), str(RECIPE)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 2
        assert "not running inside a Slurm job" in r.stderr and "sbatch" in r.stderr, r.stderr


def test_sweep_runs_one_array_task_per_recipe_and_seed(
        slurm: LocalSlurm, tiny_data: dict, tmp_path: Path) -> None:
    family = tmp_path / "family"          # the tiny family's base and its Sessa member
    family.mkdir()
    for name in ("base.yaml", "sessa.yaml"):
        (family / name).write_text((RECIPE.parent / name).read_text())
    common = {**tiny_data, "train.steps": 4, "checkpoint.every": 0, "eval.every": 0,
              "eval.max_batches": 1, "data.num_workers": 0}
    out = tmp_path / "sweep"
    r = slurm.run(str(ROOT / "slurm" / "sweep.sh"), "--seeds", "1,2", "--out", str(out),
                  str(family), *[f"{k}={v}" for k, v in common.items()], "--", *CPU_JOB,
                  cwd=ROOT)
    job_id = r.stdout.strip()
    assert job_id.isdigit(), r.stderr
    assert "2 tasks (1 recipes x 2 seeds)" in r.stderr       # base.yaml is not a member
    slurm.wait_gone(job_id, timeout=240)
    for task, seed in enumerate((1, 2)):
        run_dir = out / f"sessa-seed{seed}"
        status = json.loads((run_dir / "status.json").read_text())
        logs = "\n".join(p.read_text() for p in (out / "logs").iterdir())
        assert status["state"] == "finished" and status["step"] == 4, logs
        assert f"run.seed={seed}" in (out / "logs" / f"sweep-family-{job_id}_{task}.out").read_text()
    assert losses(out / "sessa-seed1") != losses(out / "sessa-seed2")   # the seed took effect


def test_eval_job_scores_the_trained_run(slurm: LocalSlurm, tiny_data: dict, reference_run,
                                         tmp_path: Path) -> None:
    run_dir, _, ref_rc = reference_run
    assert ref_rc == 0
    log, result = tmp_path / "eval.out", tmp_path / "ppl.json"
    r = slurm.run("sbatch", "--wait", f"--output={log}", *CPU_JOB, str(ROOT / "slurm" / "eval.sh"),
                  str(run_dir), "ppl", "--data", tiny_data["data.valid"], "--max-samples", "32",
                  "--json", str(result), cwd=ROOT, check=False, timeout=180)
    assert r.returncode == 0, log.read_text()
    assert "ppl" in json.loads(result.read_text()), result.read_text()


def test_eval_refuses_an_incomplete_checkpoint(slurm: LocalSlurm, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)               # no COMPLETE marker: still being written
    log = tmp_path / "eval.out"
    r = slurm.run("sbatch", "--wait", f"--output={log}", *CPU_JOB, str(ROOT / "slurm" / "eval.sh"),
                  str(ckpt), "ppl", cwd=ROOT, check=False, timeout=120)
    assert r.returncode != 0
    assert "is not a complete checkpoint (no COMPLETE marker)" in log.read_text()
