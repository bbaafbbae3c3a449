"""Learning-rate schedules: linear warmup, then cosine to min_lr, or warmup-stable-decay."""

from __future__ import annotations

import math

import pytest

from sessa_pt.config import load_config
from sessa_pt.parallel.engine import lr_lambda, param_groups


def sched(schedule: str, **kw):
    ov = [f"optim.schedule={schedule}", "optim.lr=1.0", "optim.min_lr=0.1",
          "optim.warmup_steps=10", "train.steps=110"] + [f"{k}={v}" for k, v in kw.items()]
    return lr_lambda(load_config(None, ov))


def test_cosine():
    f = sched("cosine")
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_wsd():
    f = sched("wsd", **{"optim.decay_fraction": 0.2})   # decay over the last 22 steps
    assert f(50) == 1.0 and f(87) == 1.0
    assert f(88) < 1.0 and f(109) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_constant_and_no_decay_groups():
    assert sched("constant")(100) == 1.0
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_weight_decay_groups_by_shape_not_by_name():
    """Matrices decay whatever they are called; vectors and flagged parameters do not."""
    import torch

    m = torch.nn.Module()
    m.layernorm_proj = torch.nn.Linear(4, 4)          # a matrix with "norm" in its name
    m.relative_bias = torch.nn.Parameter(torch.zeros(3, 4))
    m.gain = torch.nn.Parameter(torch.ones(4))
    m.A_log = torch.nn.Parameter(torch.zeros(2, 2))
    m.A_log._no_weight_decay = True
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.layernorm_proj.weight),
                                                id(m.relative_bias)}
    assert {id(p) for p in no_decay["params"]} == {id(m.layernorm_proj.bias), id(m.gain),
                                                   id(m.A_log)}
