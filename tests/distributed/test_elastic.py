"""Elastic checkpoints: a checkpoint written under one layout resumes under another, and the
steps after the resume match the uninterrupted run of the original layout (losses within 1e-5
in fp32, identical data samples). Also: a damaged newest checkpoint (4 KB of random bytes inside
a file; a file header overwritten) is named and the run falls back to the previous one; a run
killed mid-save resumes on another layout from the last complete checkpoint.

Cost: each launch runs several layouts one after another (tests/distributed/worker.py):
2 processes save (TP=2, PP=2, DP=2 under ZeRO-0/1/3, Sessa and Mamba2); 4 processes save
TP2xPP2; one 2-process run is SIGKILLed mid-save; then one 1-process and one 2-process launch
resume every checkpoint on its target layout."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.distributed.conftest import read_log, tiny_overrides, torchrun

pytestmark = pytest.mark.slow
STEPS, EVERY = 6, 3

# name: (mixer, saving layout, processes)
SOURCES = {
    "sessa_tp2": ("sessa", {"parallel.tp": 2}, 2),
    "sessa_pp2": ("sessa", {"parallel.pp": 2}, 2),
    "sessa_dp2z1": ("sessa", {"parallel.zero_stage": 1}, 2),
    "sessa_dp2z0": ("sessa", {"parallel.zero_stage": 0}, 2),
    "sessa_dp2z3": ("sessa", {"parallel.zero_stage": 3,
                              "parallel.zero3_persistence_threshold": 0}, 2),
    "mamba2_tp2": ("mamba2", {"parallel.tp": 2}, 2),
    "mamba2_pp2": ("mamba2", {"parallel.pp": 2}, 2),
    "mamba2_dp2z1": ("mamba2", {"parallel.zero_stage": 1}, 2),
    "sessa_dp2z1_bf16": ("sessa", {"parallel.zero_stage": 1, "train.precision": "bf16"}, 2),
    "sessa_tp2pp2": ("sessa", {"parallel.tp": 2, "parallel.pp": 2}, 4),
    "mamba2_tp2pp2": ("mamba2", {"parallel.tp": 2, "parallel.pp": 2}, 4),
}
Z3 = {"parallel.zero_stage": 3, "parallel.zero3_persistence_threshold": 0}
# (source, target layout, processes)
TARGETS = [
    ("sessa_tp2", {"parallel.zero_stage": 1}, 1),          # TP=2 -> TP=1
    ("sessa_pp2", {"parallel.zero_stage": 1}, 1),          # PP=2 -> PP=1
    ("sessa_dp2z1", {"parallel.zero_stage": 1}, 1),        # DP=2 ZeRO-1 -> DP=1
    ("sessa_dp2z3", {"parallel.zero_stage": 0}, 1),        # ZeRO-3 -> ZeRO-0, DP=2 -> 1
    ("mamba2_tp2", {"parallel.zero_stage": 1}, 1),
    ("mamba2_pp2", {"parallel.zero_stage": 1}, 1),
    ("mamba2_dp2z1", {"parallel.zero_stage": 1}, 1),
    ("sessa_dp2z1", {"parallel.tp": 2}, 2),                # TP=1 -> TP=2
    ("sessa_dp2z1", Z3, 2),                                # ZeRO-1 -> ZeRO-3
    ("sessa_dp2z0", Z3, 2),                                # ZeRO-0 -> ZeRO-3
    ("mamba2_dp2z1", {"parallel.tp": 2}, 2),
    ("mamba2_dp2z1", Z3, 2),
    ("sessa_tp2pp2", {"parallel.pp": 2}, 2),               # TP2xPP2 (4 processes) -> PP=2
    ("sessa_tp2pp2", {"parallel.tp": 2}, 2),               #                        -> TP=2
    ("mamba2_tp2pp2", {"parallel.pp": 2}, 2),
    ("mamba2_tp2pp2", {"parallel.zero_stage": 1}, 2),      #                        -> DP=2
    ("sessa_dp2z1_bf16", {"parallel.zero_stage": 1, "train.precision": "bf16"}, 2),   # same
]
BF16_CROSS = ("sessa_dp2z1_bf16", {"parallel.zero_stage": 0, "train.precision": "bf16"}, 1)
GBS8 = ("sessa_dp2z1", {"parallel.zero_stage": 1, "train.global_batch_size": 8,
                        "checkpoint.allow_batch_size_change": True}, 1)


def _ov(lm_data, mixer, run_dir, layout) -> list[str]:
    return tiny_overrides(lm_data, mixer, **{"run.dir": run_dir, "train.steps": STEPS,
                                             "checkpoint.every": EVERY,
                                             "checkpoint.keep_last": 5, **layout})


def _launch(nproc, plans, tmp_path, tag, env=None, check=True):
    spec = tmp_path / f"plan_{tag}.json"
    spec.write_text(json.dumps(plans, default=str))
    return torchrun(nproc, ["tests/distributed/worker.py", str(spec)], env=env, check=check)


def _copy_checkpoint(src_run, dst_run, step=EVERY):
    name = f"step_{step:08d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)


def _damage(path, header: bool) -> None:
    data = bytearray(path.read_bytes())
    if header:
        data[:64] = os.urandom(64)
    else:
        mid = len(data) // 2
        data[mid:mid + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


def _assert_continues(name, got, ref, tol=1e-5) -> None:
    assert [r["step"] for r in got] == list(range(EVERY + 1, STEPS + 1)), name
    for g, r in zip(got, ref[EVERY:]):
        assert g["sample_id_sum"] == r["sample_id_sum"] and g["samples"] == r["samples"], name
        assert g["loss"] == pytest.approx(r["loss"], abs=tol, rel=tol), (name, g, r)


def test_resume_on_other_layouts(lm_data, tmp_path):
    src = {name: tmp_path / "src" / name for name in SOURCES}
    for nproc in (2, 4):
        plans = [_ov(lm_data, mixer, src[name], layout)
                 for name, (mixer, layout, n) in SOURCES.items() if n == nproc]
        _launch(nproc, plans, tmp_path, f"save{nproc}")
    ref = {name: read_log(d) for name, d in src.items()}
    state = json.loads((src["sessa_dp2z3"] / "checkpoints" / "step_00000003" /
                        "trainer_state.json").read_text())
    assert state["zero3_partitioned_params"] > 0        # DeepSpeed really partitioned them

    # A 2-process TP=2 run SIGKILLed while writing its step-6 checkpoint.
    killed = tmp_path / "killed"
    proc = _launch(2, [_ov(lm_data, "sessa", killed, {"parallel.tp": 2})], tmp_path, "kill",
                   env={"SESSA_PT_FAULT": "kill_in_save:6"}, check=False)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "step_00000006.tmp").is_dir()

    # Damaged newest checkpoints (the DP=2 ZeRO-1 run, both of its checkpoints copied).
    damaged = {}
    for kind, header in (("optim", False), ("model", True)):
        d = tmp_path / f"damaged_{kind}"
        shutil.copytree(src["sessa_dp2z1"] / "checkpoints", d / "checkpoints")
        target = d / "checkpoints" / "step_00000006" / kind / "rank_00001.safetensors"
        _damage(target, header)
        damaged[kind] = d

    runs: dict[int, list] = {1: [], 2: []}
    checks = []
    for i, (name, layout, nproc) in enumerate(TARGETS):
        d = tmp_path / "dst" / f"{i:02d}_{name}"
        _copy_checkpoint(src[name], d)
        runs[nproc].append(_ov(lm_data, SOURCES[name][0], d, layout))
        checks.append((name, d))
    runs[1].append(_ov(lm_data, "sessa", killed, {"parallel.zero_stage": 1}))   # tp2 -> tp1
    checks.append(("sessa_tp2", killed))
    for kind, d in damaged.items():
        runs[1].append(_ov(lm_data, "sessa", d, {"parallel.zero_stage": 1}))
        checks.append(("sessa_dp2z1", d))
    extra = {}
    for tag, (name, layout, nproc) in (("bf16_cross", BF16_CROSS), ("gbs8", GBS8)):
        extra[tag] = tmp_path / "dst" / tag
        _copy_checkpoint(src[name], extra[tag])
        runs[nproc].append(_ov(lm_data, SOURCES[name][0], extra[tag], layout))
    outputs = {n: _launch(n, plans, tmp_path, f"resume{n}") for n, plans in runs.items()}

    for name, d in checks:
        got = [r for r in read_log(d) if r["step"] > EVERY]
        # bf16 on the same layout resumes bitwise (fp32 masters restored, bf16 weights re-cast)
        _assert_continues(f"{name} -> {d.name}", got, ref[name], 0 if "bf16" in name else 1e-5)
    # bf16 on another layout (ZeRO-1 on 2 processes -> ZeRO-0 on 1): bf16 rounding differs
    got = read_log(extra["bf16_cross"])
    _assert_continues("bf16 -> zero0 dp1", got, ref["sessa_dp2z1_bf16"], 2e-2)
    # another global batch size (16 -> 8, allowed explicitly): the data continues at sample 48
    got = read_log(extra["gbs8"])
    assert [r["step"] for r in got] == [4, 5, 6] and got[0]["samples"] == 8
    assert got[0]["sample_id_sum"] + got[1]["sample_id_sum"] == \
        ref["sessa_dp2z1"][3]["sample_id_sum"]
    out1 = outputs[1].stdout
    assert "layout tp=2 pp=1 dp=1 zero=1 -> tp=1 pp=1 dp=1 zero=1" in out1
    assert "layout tp=1 pp=1 dp=2 zero=3 -> tp=1 pp=1 dp=1 zero=0" in out1
    assert "layout tp=2 pp=2 dp=1 zero=1 -> tp=1 pp=2 dp=1 zero=1" in outputs[2].stdout
    for kind, d in damaged.items():
        assert f"step_00000006 is damaged ({kind}/rank_00001.safetensors does not match its " \
               "sha256" in out1, kind
        assert (d / "checkpoints" / "step_00000006.damaged").is_dir()
    assert not (killed / "checkpoints" / "step_00000006.tmp").exists()
