"""The opt-in step profiler (SESSA_PT_PROFILE=<first>[:<n>])."""

from __future__ import annotations

import pathlib

import pytest
import torch

from sessa_pt.train.profiling import StepProfiler


def test_profiles_the_requested_steps_only(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("SESSA_PT_PROFILE", "2:2")
    prof = StepProfiler(tmp_path, rank=0)
    x = torch.randn(64, 64)
    for step in range(1, 5):
        prof.before_step(step)
        x = torch.mm(x, x).tanh()
        prof.after_step(step)
        written = (tmp_path / "profile_rank0.txt").is_file()
        assert written == (step >= 3), step      # written when step 3 (the last) ends
    text = (tmp_path / "profile_rank0.txt").read_text()
    assert text.startswith("steps 2..3") and "aten::mm" in text
    stacks = (tmp_path / "profile_stacks_rank0.txt").read_text()
    assert "aten::mm" in stacks and "test_profiling.py" in stacks   # the calling line


def test_off_by_default_and_bad_spec(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.delenv("SESSA_PT_PROFILE", raising=False)
    prof = StepProfiler(tmp_path, rank=0)
    prof.before_step(0)
    prof.after_step(0)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("SESSA_PT_PROFILE", "eight")
    with pytest.raises(SystemExit, match="expected <first step>"):
        StepProfiler(tmp_path, rank=0)
