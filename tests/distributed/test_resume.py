"""Exact resume: a run interrupted at step 3 (checkpoint) continues with bitwise-identical
losses for steps 4-6, into the same mlflow run; resuming with another data-parallel size
consumes the same samples and matches to fp32 rounding (the gradient all-reduce sums in another
order, so bitwise equality cannot hold there); a run SIGKILLed during a step, and during a
save, resumes from the last complete checkpoint with no sample lost or repeated. Other layouts
(tp, pp, dp under every ZeRO stage): test_elastic.py."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.distributed.conftest import read_log, tiny_overrides, torchrun

pytestmark = pytest.mark.slow


def _train(nproc, overrides, env=None, check=True):
    return torchrun(nproc, ["-m", "sessa_pt.train", "recipes/tiny/sessa.yaml", *overrides],
                    env=env, check=check)


def _ov(lm_data, run_dir, **extra):
    return tiny_overrides(lm_data, **{"run.dir": run_dir, "train.steps": 6,
                                      "checkpoint.every": 3, "checkpoint.keep_last": 5,
                                      "parallel.zero_stage": 0, **extra})


def test_resume_is_exact_and_continues_the_mlflow_run(lm_data, tmp_path):
    full = tmp_path / "full"
    _train(2, _ov(lm_data, full, **{"tracking.enabled": True}))
    ref = read_log(full)
    # Same layout: a copy of the run as it was after the step-3 checkpoint.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003",
                    resumed / "checkpoints" / "step_00000003")
    shutil.copy(full / "mlflow.db", resumed / "mlflow.db")
    (resumed / "train_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ref[:3]))
    out = _train(2, _ov(lm_data, resumed, **{"tracking.enabled": True}))
    assert "resumed from" in out.stdout
    got = read_log(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, r in zip(got[3:], ref[3:]):
        assert g["loss"] == r["loss"] and g["grad_norm"] == r["grad_norm"]   # bitwise
        assert g["sample_id_sum"] == r["sample_id_sum"]
    status = json.loads((resumed / "status.json").read_text())
    saved = json.loads((full / "checkpoints" / "step_00000003" / "trainer_state.json")
                       .read_text())
    assert status["mlflow_run_id"] == saved["mlflow_run_id"] and status["state"] == "finished"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{resumed}/mlflow.db")
    hist = client.get_metric_history(saved["mlflow_run_id"], "loss")
    assert sorted({m.step for m in hist}) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(saved["mlflow_run_id"])
    assert int(run.data.params["params_total"]) > 0 and "flops_per_token_fwd" in run.data.params
    assert {"config.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # Another DP size (2 -> 1 process, ZeRO-0 keeps the optimizer state unsharded).
    one = tmp_path / "dp1"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    _train(1, _ov(lm_data, one))
    got1 = read_log(one)
    assert [r["step"] for r in got1] == [4, 5, 6]
    for g, r in zip(got1, ref[3:]):
        assert g["sample_id_sum"] == r["sample_id_sum"]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("fault", ["kill_in_step:5", "kill_in_save:6"])
def test_sigkill_resumes_from_last_complete_checkpoint(fault, lm_data, tmp_path):
    ref_dir = tmp_path / "ref"
    _train(2, _ov(lm_data, ref_dir, **{"train.steps": 8, "checkpoint.keep_last": 2}))
    ref = read_log(ref_dir)
    kept = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000008"]          # keep_last=2
    run = tmp_path / "killed"
    ov = _ov(lm_data, run, **{"train.steps": 8})
    proc = _train(2, ov, env={"SESSA_PT_FAULT": fault}, check=False)
    assert proc.returncode != 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000003" in ckpts
    if fault.startswith("kill_in_save"):
        assert "step_00000006.tmp" in ckpts                     # the interrupted save
        assert not (run / "checkpoints" / "step_00000006").exists()
    _train(2, ov)
    got = read_log(run)
    assert [r["step"] for r in got] == list(range(1, 9))
    for g, r in zip(got, ref):
        assert g["sample_id_sum"] == r["sample_id_sum"] and g["samples"] == r["samples"]
        assert g["loss"] == r["loss"]
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_resume_into_a_different_model_is_a_clear_error(lm_data, tmp_path):
    run = tmp_path / "strict"
    _train(1, _ov(lm_data, run, **{"train.steps": 3}))
    proc = _train(1, _ov(lm_data, run, **{"model.layer_mixers": "[sessa,sessa,attention,sessa]"}),
                  check=False)
    assert proc.returncode != 0
    # Refused before any model is built, naming the changed setting.
    assert "cannot change on resume: model.layer_mixers" in proc.stderr
