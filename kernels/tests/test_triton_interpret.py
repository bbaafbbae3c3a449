"""The Triton kernels on tiny shapes. Without CUDA they run under Triton's interpreter
(TRITON_INTERPRET=1 is set here, before the kernels' lazy import); with CUDA, on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _helpers import feedback_inputs, rel_err, value_and_grads
from sessa_kernels.decode import feedback_decode_step, feedback_decode_torch
from sessa_kernels.triton_feedback import feedback_triton

from sessa_pt.models.feedback import feedback_dense

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("s", "dq_b", "dk_b", "dgamma", "df")


@pytest.mark.parametrize("T", [1, 2, 17, 40])
@pytest.mark.parametrize("routing", ["sharp", "diffuse"])
def test_triton_tiny_matches_dense(T: int, routing: str) -> None:
    """fp32 inputs, 16-row chunks and 16-channel blocks, so several chunks and blocks talk."""
    q, k, g, f, ds = feedback_inputs(2, T, 16, 24, routing=routing, dtype=torch.float32,
                                     device=DEV, seed=T)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, block_d=16), q, k, g, f, ds)
    tol = 1e-5 if DEV == "cpu" else 1e-2   # interpreter: exact fp32; GPU: tf32 products
    for name, x, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(x, r) < tol, name


@pytest.mark.parametrize("P", [0, 1, 130])
def test_decode_triton_tiny(P: int) -> None:
    gen = torch.Generator().manual_seed(P)
    B, Dk, D = 3, 24, 40
    q, g, f = torch.randn(B, Dk, generator=gen), torch.rand(B, generator=gen) * 2 - 1, \
        torch.randn(B, D, generator=gen)
    K, S = torch.randn(B, P, Dk, generator=gen), torch.randn(B, P, D, generator=gen)
    q, g, f, K, S = (x.to(DEV) for x in (q, g, f, K, S))
    out = feedback_decode_step(q, g, f, K, S, impl="triton")
    ref = f.double() if P == 0 else feedback_decode_torch(
        q.double(), g.double(), f.double(), K.double(), S.double(), Dk**-0.5)
    assert rel_err(out, ref) < 1e-5
