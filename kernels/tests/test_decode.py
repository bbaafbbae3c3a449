"""The decode step (PyTorch path) equals the parallel dense forward, token by token."""

from __future__ import annotations

import torch
from _helpers import feedback_inputs, rel_err
from sessa_kernels.decode import feedback_decode_step

from sessa_pt.models.feedback import feedback_dense


def test_decode_steps_match_parallel_forward_fp64() -> None:
    q, k, g, f, _ = feedback_inputs(2, 20, 8, 6, routing="sharp", dtype=torch.float64)
    ref = feedback_dense(q, k, g, f)
    s = []
    for t in range(20):
        S = torch.stack(s, 1) if s else f[:, :0]
        s.append(feedback_decode_step(q[:, t], g[:, t], f[:, t], k[:, :t], S))
    assert rel_err(torch.stack(s, 1), ref) < 1e-12


def test_decode_validates_shapes() -> None:
    import pytest

    with pytest.raises(ValueError, match="inconsistent"):
        feedback_decode_step(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 3),
                             torch.zeros(2, 5, 4), torch.zeros(2, 5, 2))
