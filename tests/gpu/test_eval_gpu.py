"""The memory-tail diagnostic on CUDA (run on the device machine: ``pytest -m gpu
tests/gpu/test_eval_gpu.py``): the influence a trained run's ``sessa-eval memory-tail`` computes
on the GPU equals the CPU computation of the same mixer (the probes are drawn on the CPU
generator and moved to the output's device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sessa_pt.eval import memory_tail as mt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mixer_name", ["sessa", "attention", "mamba2"])
def test_influence_on_cuda_equals_cpu(mixer_name: str) -> None:
    T, tau = 96, 2
    lags = mt.log_spaced_lags(T - 1 - tau, 12)
    mixer = mt._build_mixer(mixer_name, 64, 2, 0, "model")          # float64, PyTorch paths
    a = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cpu = mt.jacobian_influence(mixer, a, tau, lags, n_probes=4, seed=1)
    gpu = mt.jacobian_influence(mixer.cuda(), a.cuda(), tau, lags, n_probes=4, seed=1)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-8, atol=1e-14)
    if mixer_name == "sessa":
        mixer_cpu = mt._build_mixer(mixer_name, 64, 2, 0, "model")
        np.testing.assert_allclose(mt.sessa_mixer_influence(mixer.cuda(), a.cuda(), tau),
                                   mt.sessa_mixer_influence(mixer_cpu, a, tau), rtol=1e-8,
                                   atol=1e-14)
