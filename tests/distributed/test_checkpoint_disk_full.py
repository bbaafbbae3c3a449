"""Disk full during a save: a run whose run dir is a small real tmpfs (room for one checkpoint,
not two) fails with "no space left on device" and the path, leaves no ``.tmp`` directory, keeps
the previous checkpoint intact (it verifies against its manifest), and its status is "failed"."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from sessa_pt.config import load_config
from sessa_pt.models.lm import DecoderLM
from sessa_pt.train.checkpoint import complete_checkpoints
from sessa_pt.train.ckpt_files import verify_checkpoint
from tests.distributed.conftest import tiny_overrides, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture
def small_tmpfs(tmp_path, request):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()

    def mount(size_bytes: int):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                               str(mnt)], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): "
                        f"{proc.stderr.strip()}")
        request.addfinalizer(lambda: subprocess.run(["umount", str(mnt)], check=False))
        return mnt

    return mount


def test_disk_full_during_save(lm_data, small_tmpfs):
    ov = tiny_overrides(lm_data, **{"train.steps": 6, "checkpoint.every": 3,
                                    "checkpoint.keep_last": 5, "parallel.zero_stage": 0})
    cfg = load_config(None, ov)
    with torch.device("meta"):
        n = DecoderLM(cfg.model).num_params()["total"]
    one_checkpoint = 12 * n                     # fp32 weights + two Adam moments
    mnt = small_tmpfs(int(1.5 * one_checkpoint) + (256 << 10))
    run = mnt / "run"
    proc = torchrun(1, ["-m", "sessa_pt.train", "recipes/tiny/sessa.yaml", *ov,
                        f"run.dir={run}"], check=False)
    assert proc.returncode != 0
    assert "no space left on device while writing" in proc.stderr
    assert str(run / "checkpoints" / "step_00000006.tmp") in proc.stderr
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000003"], ckpts          # no .tmp left, the previous one kept
    verify_checkpoint(complete_checkpoints(run / "checkpoints")[-1])
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
