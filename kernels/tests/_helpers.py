"""Shared input generators and error measures for the sessa_kernels tests."""

from __future__ import annotations

import torch
from torch import Tensor


def feedback_inputs(B: int, T: int, Dk: int, D: int, *, routing: str, dtype: torch.dtype,
                    device: str = "cpu", seed: int = 0) -> tuple[Tensor, ...]:
    """q_b, k_b, gamma, f, ds. ``routing='sharp'``: logits of std ~6 (near one-hot rows);
    ``'diffuse'``: std ~0.1 (near uniform rows). gamma is uniform over (-0.99, 0.99)."""
    gen = torch.Generator().manual_seed(seed)
    amp = {"sharp": 2.5, "diffuse": 0.3}[routing]
    q = torch.randn(B, T, Dk, generator=gen) * amp
    k = torch.randn(B, T, Dk, generator=gen) * amp
    g = torch.rand(B, T, generator=gen) * 1.98 - 0.99
    f = torch.randn(B, T, D, generator=gen)
    ds = torch.randn(B, T, D, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, g, f, ds))


def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; absolute when the reference is (near) zero."""
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 1e-6 else 1.0)


def value_and_grads(fn, q: Tensor, k: Tensor, g: Tensor, f: Tensor, ds: Tensor
                    ) -> list[Tensor]:
    """[s, dq_b, dk_b, dgamma, df] of fn(q, k, g, f) with upstream gradient ds."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, g, f)]
    s = fn(*leaves)
    grads = torch.autograd.grad(s, leaves, ds.to(s.dtype))
    return [s.detach(), *grads]
