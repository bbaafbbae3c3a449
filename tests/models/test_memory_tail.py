"""The memory-tail diagnostic and its CLI: Sessa's power law (beta = 1 - gamma), ~1/lag for
diffuse attention, exponential decay for Mamba2."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sessa_pt.eval import memory_tail as mt


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.8])
def test_cli_fits_beta_one_minus_gamma(gamma, tmp_path):
    png = tmp_path / "tail.png"
    out = subprocess.run([sys.executable, "-m", "sessa_pt.eval.memory_tail", "--gamma",
                          str(gamma), "--plot", str(png)], capture_output=True, text=True,
                         check=True).stdout
    beta = float(out.split("power law beta = ")[1].split()[0])
    assert abs(beta - (1 - gamma)) < 0.02, out
    assert png.stat().st_size > 1000
    assert any(line.split()[:1] == ["4096"] for line in out.splitlines())  # table reaches 4096


def test_diffuse_attention_decays_like_one_over_lag():
    args = mt.build_parser().parse_args(["--mixer", "attention", "--routing", "uniform",
                                         "--seq-len", "513"])
    lags, infl, _ = mt.measure(args)
    fit = mt.fit_tail(lags, infl, min_lag=32)
    assert abs(fit.beta - 1.0) < 0.05 and fit.r2_power > 0.98


def test_mamba2_decays_exponentially():
    # At default init the slowest heads decay by ~0.999 per token, so look at long lags.
    args = mt.build_parser().parse_args(["--mixer", "mamba2", "--routing", "model",
                                         "--seq-len", "2049", "--n-lags", "24"])
    lags, infl, _ = mt.measure(args)
    fit = mt.fit_tail(lags, infl, min_lag=256)
    assert fit.r2_exp > 0.97 and fit.r2_exp > fit.r2_power   # straight in lag, not log-lag
    assert infl[-1] < 1e-4 * infl[0]


def test_sessa_with_its_own_routing_is_the_resolvent_column():
    """With the mixer's own routing, the influence of f_tau is column tau of (I - B_fb)^-1,
    built here independently from the mixer's q_b, k_b and gamma with an explicit inverse."""
    T, tau = 40, 3
    args = mt.build_parser().parse_args(["--routing", "model", "--seq-len", str(T),
                                         "--tau", str(tau), "--n-lags", "64"])
    lags, infl, closed = mt.measure(args)
    assert closed is None
    mixer = mt._build_mixer("sessa", args.d_model, args.n_heads, args.seed, "model")
    gen = torch.Generator().manual_seed(args.seed)
    a = torch.randn(1, T, args.d_model, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        q_b, k_b, gamma = mixer.feedback_inputs(a)
    logits = (q_b[0] @ k_b[0].T) / math.sqrt(q_b.shape[-1])
    strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
    alpha = torch.softmax(logits.masked_fill(~strict, float("-inf")), dim=-1).nan_to_num(0.0)
    resolvent = torch.linalg.inv(torch.eye(T, dtype=torch.float64) - gamma[0, :, None] * alpha)
    want = resolvent[tau:, tau].abs().numpy()[lags]
    np.testing.assert_allclose(infl, want, rtol=1e-10, atol=1e-14)


def test_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "sessa_pt.eval.memory_tail", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--mixer", "--routing", "--gamma", "--plot", "--fit-min-lag"):
        assert opt in out
