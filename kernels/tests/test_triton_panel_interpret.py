"""The panel variant of the Triton solves (``solve="panel"``, ``SESSA_SOLVE=panel``) on tiny
shapes: against the float64 dense reference and against the default queue solves. Without
CUDA the kernels run under Triton's interpreter; with CUDA, on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _helpers import feedback_inputs, rel_err, value_and_grads
from sessa_kernels.triton_feedback import feedback_triton, panel_width

from sessa_pt.models.feedback import feedback_dense

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("s", "dq_b", "dk_b", "dgamma", "df")
TOL = 1e-5 if DEV == "cpu" else 1e-2   # interpreter: exact fp32; GPU: tf32 products


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("routing", ["sharp", "diffuse"])
def test_panel_tiny_matches_dense(T: int, routing: str) -> None:
    """16-row chunks, 16-channel blocks and super-chunks of 32 rows: from T = 63 on, several
    super-chunks (the last one partial) each with several chunks and channel blocks."""
    q, k, g, f, ds = feedback_inputs(2, T, 16, 24, routing=routing, dtype=torch.float32,
                                     device=DEV, seed=T)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, block_d=16, solve="panel",
                                                     panel_rows=32), q, k, g, f, ds)
    for name, x, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(x, r) < TOL, name


@pytest.mark.parametrize("T", [65, 200])
def test_panel_equals_queue_default_blocks(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default blocks (64-row chunks), the switch by SESSA_SOLVE, one super-chunk (default
    budget: W = T_pad) and W = 64 (one chunk per super-chunk): equal to the queue solves."""
    q, k, g, f, ds = feedback_inputs(1, T, 32, 40, routing="sharp", dtype=torch.float32,
                                     device=DEV, seed=T + 1)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    queue = value_and_grads(feedback_triton, q, k, g, f, ds)
    monkeypatch.setenv("SESSA_SOLVE", "panel")
    for rows in (None, 64):
        out = value_and_grads(lambda *a, rows=rows: feedback_triton(*a, panel_rows=rows),
                              q, k, g, f, ds)
        for name, x, xq, r in zip(NAMES, out, queue, ref, strict=True):
            assert rel_err(x, r) < TOL, (name, rows)
            assert rel_err(x, xq) < TOL, (name, rows)


def test_panel_float64_inputs_and_validation() -> None:
    q, k, g, f, ds = feedback_inputs(1, 20, 8, 8, routing="diffuse", dtype=torch.float64,
                                     device=DEV, seed=3)
    ref = value_and_grads(feedback_dense, q, k, g, f, ds)
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, solve="panel",
                                                     panel_rows=16), q, k, g, f, ds)
    assert out[0].dtype == torch.float64
    for name, x, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(x, r) < TOL, name
    with pytest.raises(ValueError, match="solve"):
        feedback_triton(q, k, g, f, solve="flash")


def test_panel_width_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """W: a multiple of block_m in [block_m, T_pad], the scratch within SESSA_PANEL_MIB."""
    assert panel_width(2, 8192, 64, 2) == 7680          # 256 MiB / (2 * 8192 * 2.125 B)
    assert panel_width(1, 32768, 64, 2) == 3840
    assert panel_width(1, 131072, 64, 2) == 960
    assert panel_width(8, 2048, 64, 2) == 2048          # everything fits: W = T
    assert panel_width(1, 100, 64, 2) == 128            # T rounded up to the chunk
    assert panel_width(1, 1 << 24, 64, 2) == 64         # never below one chunk
    assert panel_width(1, 1000, 16, 4, panel_rows=40) == 32
    monkeypatch.setenv("SESSA_PANEL_MIB", "64")
    assert panel_width(1, 32768, 64, 2) == 960
    for B, T in ((2, 8192), (1, 32768), (1, 131072)):
        W = panel_width(B, T, 64, 2)
        assert B * W * T * (2 + 8 / 64) <= 64 * 2**20
