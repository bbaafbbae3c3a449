"""The chunked feedback solve against the dense reference, in float64 on the CPU."""

from __future__ import annotations

import pytest
import torch
from _helpers import feedback_inputs, rel_err, value_and_grads
from sessa_kernels.chunked import feedback_chunked

from sessa_pt.models.feedback import feedback_dense

NAMES = ("s", "dq_b", "dk_b", "dgamma", "df")


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("routing", ["sharp", "diffuse"])
def test_chunked_matches_dense_fp64(T: int, routing: str) -> None:
    q, k, g, f, ds = feedback_inputs(2, T, 8, 5, routing=routing, dtype=torch.float64, seed=T)
    ref = value_and_grads(feedback_dense, q, k, g, f, ds)
    for C in (1, 16, 64, 100):
        out = value_and_grads(lambda *a, C=C: feedback_chunked(*a, chunk_size=C), q, k, g, f, ds)
        for name, x, r in zip(NAMES, out, ref, strict=True):
            assert rel_err(x, r) < 1e-10, (name, C)


def test_chunked_keeps_dtype_and_validates() -> None:
    q, k, g, f, _ = feedback_inputs(1, 10, 4, 3, routing="diffuse", dtype=torch.bfloat16)
    s = feedback_chunked(q, k, g, f, chunk_size=4)
    assert s.dtype == torch.bfloat16 and s.shape == f.shape
    ref = feedback_dense(q.double(), k.double(), g.double(), f.double())
    assert rel_err(s, ref) < 1e-2
    with pytest.raises(ValueError, match="chunk_size"):
        feedback_chunked(q, k, g, f, chunk_size=0)
    with pytest.raises(ValueError, match="gamma"):
        feedback_chunked(q, k, g[:, :5], f)


def test_chunked_uniform_routing_positional_code() -> None:
    """docs/model.md §5: zero q/k, gamma 0.5, constant input -> c = 1, 1.5, 1.625, 1.6875."""
    T = 6
    z = torch.zeros(1, T, 4, dtype=torch.float64)
    s = feedback_chunked(z, z, torch.full((1, T), 0.5, dtype=torch.float64),
                         torch.ones(1, T, 1, dtype=torch.float64), chunk_size=4)
    assert torch.allclose(s[0, :4, 0], torch.tensor([1, 1.5, 1.625, 1.6875], dtype=s.dtype))
