"""Long runs survive their faults: each fault injected the way it happens (a divergent lr,
signals to the launcher and to a worker, a dead or missing tracking server, a second launch,
an error or a hang on one rank), with real torchrun launches on the tiny model."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import REPO, read_log, tiny_overrides, torchrun

pytestmark = pytest.mark.slow


def _train(nproc, overrides, env=None, check=False, launcher_args=()):
    return torchrun(nproc, [*launcher_args, "-m", "sessa_pt.train", "recipes/tiny/sessa.yaml",
                            *overrides], env=env, check=check)


def _single(overrides, env=None, timeout=300):
    """One process without torchrun (the trainer starts its own process group)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sessa_pt.train", "recipes/tiny/sessa.yaml",
                           *overrides], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                    **(env or {})))
    return proc, time.monotonic() - t0


def _strict(path: Path) -> dict:
    def no_nan(token):
        raise AssertionError(f"{path} holds a bare {token}")
    return json.loads(path.read_text(), parse_constant=no_nan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_finite(ckpt_dir: Path) -> bool:
    from sessa_pt.train.checkpoint import read_plain_state

    state = read_plain_state(ckpt_dir)
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def test_nonfinite_policy_spikes_and_resume_settings(lm_data, tmp_path):
    # Divergence (lr 1e4): the run fails with the step and advice, never saves NaN weights.
    div = tmp_path / "diverged"
    proc = _train(2, tiny_overrides(lm_data, **{
        "run.dir": div, "train.steps": 12, "optim.lr": 1e4, "checkpoint.every": 1,
        "parallel.zero_stage": 0, "optim.warmup_steps": 0}))
    assert proc.returncode != 0, proc.stdout
    assert "training diverged" in proc.stderr and "Lower optim.lr" in proc.stderr, proc.stderr
    status = _strict(div / "status.json")
    assert status["state"] == "failed" and "diverged" in status["error"]
    summary = _strict(div / "summary.json")
    assert summary["state"] == "failed"
    log = read_log(div)
    bad = [r["step"] for r in log if r["nonfinite"]]
    assert bad and bad[-3:] == [log[-1]["step"] - 2, log[-1]["step"] - 1, log[-1]["step"]]
    for d in (div / "checkpoints").glob("step_*"):
        assert int(d.name[5:]) < bad[0] and _model_finite(d), d

    # skip: one rank's NaN loss at step 3 is skipped on both ranks and training goes on; a
    # loss spike at step 7 is logged with the batch's sample ids. Tracked in mlflow. In bf16,
    # as on the GPU: ZeRO-1's own bf16 overflow check is off there, GuardedAdamW must skip it.
    run = tmp_path / "skip"
    ov = tiny_overrides(lm_data, **{
        "run.dir": run, "train.steps": 8, "train.nonfinite": "skip", "checkpoint.every": 3,
        "checkpoint.keep_last": 5, "train.precision": "bf16",
        "parallel.zero_stage": 1, "tracking.enabled": True,
        "tracking.system_metrics_interval_s": 0.5})
    proc = _train(2, ov, env={"SESSA_PT_FAULT": "nan_loss:3@1,spike_loss:7@0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(run)
    assert [r["step"] for r in log if r["nonfinite"]] == [3] and log[-1]["nonfinite_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in log if r["step"] != 3)
    spikes = [json.loads(x) for x in (run / "spikes.jsonl").read_text().splitlines()]
    assert [s["step"] for s in spikes] == [7] and len(spikes[0]["sample_ids"]) == 16
    assert "loss spike at step 7" in proc.stdout
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000008"]          # none of the non-finite step 3
    assert _model_finite(run / "checkpoints" / "step_00000006")
    assert _strict(run / "summary.json")["nonfinite_steps"] == 1

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run}/mlflow.db")
    run_id = _strict(run / "status.json")["mlflow_run_id"]
    got = client.get_run(run_id)
    assert got.data.metrics["nonfinite_steps"] == 1
    assert any(k.startswith("system/") for k in got.data.metrics), got.data.metrics
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "tokenizer"} <= arts, arts
    assert client.list_artifacts(run_id, "tokenizer")[0].path.endswith(".model")

    # A resume that changes the lr applies it and records it; one that changes the seed,
    # or that starts over on the checkpoints, is refused before any model is built.
    ov2 = [*ov, "train.steps=10", "optim.lr=1e-4", "optim.min_lr=1e-5"]
    proc = _train(2, ov2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 11))
    assert log[8]["lr"] <= 1e-4 < log[7]["lr"]
    assert "optim.lr: 0.003 -> 0.0001" in proc.stdout
    assert (run / "config.yaml.prev").exists()
    tags = client.get_run(run_id).data.tags
    assert "optim.lr: 0.003 -> 0.0001" in tags["config_change_step8"]
    proc, _ = _single([*ov2, "run.seed=8"])
    assert proc.returncode == 2 and "run.seed (7 -> 8)" in proc.stderr, proc.stderr[-2000:]
    proc, _ = _single([*ov2, "checkpoint.resume=false"])
    assert proc.returncode == 2 and "run.overwrite=true" in proc.stderr, proc.stderr[-2000:]
    proc, _ = _single([*ov2, "checkpoint.resume=false", "run.overwrite=true", "train.steps=2",
                       "tracking.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("skip.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000010").is_dir()
    assert [r["step"] for r in read_log(run)] == [1, 2]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class _Launch:
    """torchrun in the background, its output in files (orphaned workers keep writing to it,
    so a pipe nobody reads could fill up and block them)."""

    def __init__(self, run: Path, lm_data, name: str) -> None:
        ov = tiny_overrides(lm_data, **{"run.dir": run, "train.steps": 100000,
                                        "data.num_workers": 1, "parallel.zero_stage": 0})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "sessa_pt.train", "recipes/tiny/sessa.yaml", *ov]
        self.out_path, self.err_path = run.parent / f"{name}.out", run.parent / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err,
                                         env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.poll()

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        return self.out_path.read_text(), self.err_path.read_text()

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    @property
    def returncode(self):
        return self.proc.returncode


def _launch(run: Path, lm_data, name: str) -> _Launch:
    return _Launch(run, lm_data, name)


def _wait_steps(run: Path, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 240
    log = run / "train_log.jsonl"
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= at_least:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.communicate(10)[1][-3000:]}")
        time.sleep(0.2)
    raise AssertionError("the run did not reach its steps")


def _stopped_with_checkpoint(run: Path, after: int) -> int:
    status = _strict(run / "status.json")
    assert status["state"] == "stopped", status
    step = status["step"]
    assert step > after and (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert not (run / "LOCK").exists()
    return step


def test_stop_signals_lock_and_stack_dumps(lm_data, tmp_path):
    run = tmp_path / "sig"
    # SIGTERM to torchrun: it forwards it to each worker's process group, DataLoader workers
    # included; the run saves once at the next step boundary and every rank exits cleanly.
    proc = _launch(run, lm_data, "term")
    _wait_steps(run, proc, 3)
    workers = _children(proc.pid)
    assert len(workers) == 2
    owner = json.loads((run / "LOCK").read_text())
    # A second launch on the live run dir is refused with the owner's host and pid.
    second, _ = _single(tiny_overrides(lm_data, **{"run.dir": run}))
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {owner['pid']} on host {owner['host']}" in second.stderr
    # SIGUSR2 dumps every rank's Python stacks into the run dir.
    for pid in workers:
        os.kill(pid, signal.SIGUSR2)
    time.sleep(1.0)
    for r in (0, 1):
        assert "File" in (run / f"stacks_rank{r}.txt").read_text()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "stop requested (got SIGTERM)" in out, err[-3000:]
    assert "killed by signal" not in err and "DataLoader worker" not in err, err[-3000:]
    assert out.count("checkpoint saved") == 1
    step1 = _stopped_with_checkpoint(run, 3)
    assert "start-up: imports" in out and "model + engine" in out

    # SIGUSR1 kills torchrun itself: the orphaned workers notice, save and exit.
    proc = _launch(run, lm_data, "usr1")
    _wait_steps(run, proc, step1 + 3)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGUSR1)
    proc.proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not any(_alive(p) for p in workers), "workers outlived their launcher"
    assert "the launcher (pid" in proc.out_path.read_text()
    step2 = _stopped_with_checkpoint(run, step1 + 2)

    # SIGINT to one worker: both ranks agree at the step boundary; torchrun exits 0.
    proc = _launch(run, lm_data, "int")
    _wait_steps(run, proc, step2 + 3)
    os.kill(_children(proc.pid)[-1], signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (got SIGINT)" in out
    _stopped_with_checkpoint(run, step2 + 2)


def test_errors_hangs_and_an_unreachable_tracking_uri(lm_data, tmp_path):
    # An error on rank 1 only reaches the user, error.txt and status.json.
    run = tmp_path / "err"
    proc = _train(2, tiny_overrides(lm_data, **{"run.dir": run, "train.steps": 4}),
                  env={"SESSA_PT_FAULT": "raise_in_step:2@1"})
    assert proc.returncode != 0
    assert "rank 1 failed after step 1: RuntimeError: injected fault raise_in_step:2" in proc.stderr
    assert (run / "error.txt").read_text().startswith("rank 1 failed after step 1")
    status = _strict(run / "status.json")
    assert status["state"] == "failed" and status["failed_rank"] == 1
    assert "injected fault" in status["error"]

    # A hang on rank 1: the step timeout ends the run and every rank's stacks are on disk.
    run = tmp_path / "hang"
    t0 = time.monotonic()
    proc = _train(2, tiny_overrides(lm_data, **{"run.dir": run, "train.steps": 4,
                                                "run.step_timeout_s": 8}),
                  env={"SESSA_PT_FAULT": "hang_in_step:2@1"},
                  launcher_args=["--shutdown-timeout", "3"])
    assert proc.returncode != 0 and time.monotonic() - t0 < 200
    assert "maybe_hang" in (run / "stacks_rank1.txt").read_text()
    assert "train_step" in (run / "stacks_rank0.txt").read_text()
    assert _strict(run / "status.json")["state"] == "failed"

    # A tracking URI with no listener fails within seconds, naming the URI.
    uri = f"http://127.0.0.1:{_free_port()}"
    run = tmp_path / "nouri"
    proc, wall = _single(tiny_overrides(lm_data, **{"run.dir": run, "tracking.enabled": True,
                                                    "tracking.uri": uri}))
    assert proc.returncode == 2 and uri in proc.stderr and "unreachable" in proc.stderr
    assert "params" not in proc.stdout          # failed before any model was built
    assert wall < 120, wall


def test_a_tracking_server_that_dies_mid_run_never_stops_training(lm_data, tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--default-artifact-root",
                               str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True,     # its web workers die with it
                              env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.5)
        run = tmp_path / "outage"
        ov = tiny_overrides(lm_data, **{"run.dir": run, "train.steps": 150,
                                        "tracking.enabled": True,
                                        "tracking.uri": f"http://127.0.0.1:{port}",
                                        "tracking.flush_timeout_s": 3})
        job = subprocess.Popen([sys.executable, "-m", "sessa_pt.train",
                                "recipes/tiny/sessa.yaml", *ov], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
        _wait_steps(run, job, 5)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _, err = job.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_log(run)] == list(range(1, 151))
    assert err.count("the tracking server") == 1, err[-3000:]


def _small_valid_split(lm_data, out: Path) -> str:
    """~100 samples of text with the shards' tokenizer (the shared valid split has 7k)."""
    from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
    from sessa_pt.data import read_manifest

    tok = read_manifest(lm_data["train"]).tokenizer["path"]
    words = ["the", "letter", "was", "written", "in", "haste", "and", "she", "read", "it", "twice", "before", "the", "fire", "had", "burned", "low", "in", "the", "grate", "while", "the", "rain", "went", "on", "outside"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(330)) for i in range(8)]
    # The last samples (the short micro-batches) are noise: their loss is far from the mean,
    # so a mean of micro-batch means would differ from the token mean.
    rng = random.Random(0)
    docs.append("".join(rng.choice("qxzjkvw0123456789") for _ in range(1500)))
    corpus = out / "small.jsonl"
    corpus.write_text("".join(json.dumps({"text": d, "doc_id": f"d{i}", "source": "small"})
                              + "\n" for i, d in enumerate(docs)))
    tokenize_to_shards(TokenizeConfig(inputs=[str(corpus)], tokenizer=tok, seq_len=32,
                                      out=str(out / "small"), shard_bytes=200_000, workers=1,
                                      valid_fraction=0.0))
    return str(out / "small" / "train" / "manifest.json")


def test_pipeline_val_loss_is_token_weighted(lm_data, tmp_path):
    """pp=2 (one data-parallel rank) and pp=1 with dp=2 give the same val_loss on a set whose
    last micro-batches are part or all padding."""
    from sessa_pt.data import TokenShardDataset

    valid = _small_valid_split(lm_data, tmp_path)
    n = TokenShardDataset(valid).num_samples
    b = next(b for b in range(8, 2, -1) if 0 < n % (2 * b) <= b)   # dp=2: rank 1 all padding
    runs = [tiny_overrides({**lm_data, "valid": valid}, **{
        "run.dir": tmp_path / name, "parallel.pp": pp, "parallel.zero_stage": 1,
        "train.steps": 1, "train.micro_batch_size": b, "train.global_batch_size": 2 * b,
        "eval.max_batches": 0}) for name, pp in (("pp2", 2), ("dp2", 1))]
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun(2, ["tests/distributed/worker.py", str(spec)])
    pp2, dp2 = (_strict(tmp_path / name / "summary.json")["val_loss"] for name in ("pp2", "dp2"))
    assert pp2 == pytest.approx(dp2, rel=1e-5), (pp2, dp2, n, b)
