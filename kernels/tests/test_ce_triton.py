"""The in-place cross-entropy kernel (``sessa_kernels.ce_triton``) against its PyTorch path:
under Triton's interpreter on CPU (fp32), and in bf16 on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sessa_kernels.ce_triton import _cross_entropy_grad_torch, cross_entropy_grad_triton_


def _case(N, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    weights = torch.rand(N, generator=g)
    return logits, labels.to(device), weights.to(device)


@pytest.mark.parametrize("V,block", [(37, 16), (100, 64), (5, 16)])
def test_ce_kernel_matches_torch(V: int, block: int) -> None:
    """Several vocabulary blocks with a ragged last one; an ignored row."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits, labels, weights = _case(6, V, torch.float32, dev, seed=V)
    ref_logits = logits.double().clone()
    ref = _cross_entropy_grad_torch(ref_logits, labels, weights.double())
    out = cross_entropy_grad_triton_(logits, labels, weights, block=block)
    assert abs(out.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(logits.double(), ref_logits, atol=1e-6)
    assert (logits[1] == 0).all()                        # the ignored row has no gradient


@pytest.mark.gpu
def test_ce_kernel_bf16_gpu() -> None:
    logits, labels, weights = _case(512, 32768, torch.bfloat16, "cuda")
    ref_logits = logits.double().clone()
    ref = _cross_entropy_grad_torch(ref_logits, labels, weights.double())
    out = cross_entropy_grad_triton_(logits, labels, weights)
    assert abs(out.item() - ref.item()) < 1e-3 * abs(ref.item())
    assert (logits.double() - ref_logits).abs().max() < 1e-2 * ref_logits.abs().max()
