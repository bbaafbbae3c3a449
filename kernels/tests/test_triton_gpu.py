"""The Triton feedback kernels on the GPU against a float64 reference (bf16 tolerances).

Reference: the dense solve in float64 on the bf16-rounded inputs (T <= 4096); at T = 32768,
where T x T does not fit, the chunked path in float64 on the GPU. Run: pytest -m gpu.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import feedback_inputs, rel_err, value_and_grads
from sessa_kernels.chunked import feedback_chunked
from sessa_kernels.decode import feedback_decode_step, feedback_decode_torch

from sessa_pt.models.feedback import feedback_dense

pytestmark = pytest.mark.gpu
NAMES = ("s", "dq_b", "dk_b", "dgamma", "df")
CASES = [  # (B, T, Dk, D)
    (3, 1, 64, 64), (3, 2, 64, 64), (2, 63, 64, 96), (2, 64, 128, 64), (2, 65, 64, 200),
    (2, 1000, 256, 256), (1, 4096, 1024, 1024), (2, 4096, 64, 128), (1, 32768, 128, 128),
]


def _check_against_fp64(case: tuple[int, int, int, int], routing: str, **kw) -> None:
    from sessa_kernels.triton_feedback import feedback_triton

    B, T, Dk, D = case
    q, k, g, f, ds = feedback_inputs(B, T, Dk, D, routing=routing, dtype=torch.bfloat16,
                                     device="cuda", seed=T + D)
    if T <= 4096:
        def ref_fn(*a):
            return feedback_dense(*a)
    else:
        def ref_fn(*a):
            return feedback_chunked(*a, chunk_size=1024)
    ref = value_and_grads(ref_fn, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, **kw), q, k, g, f, ds)
    errs = {n: rel_err(x, r) for n, x, r in zip(NAMES, out, ref, strict=True)}
    print(case, routing, kw, {n: f"{e:.2e}" for n, e in errs.items()})
    assert out[0].dtype == torch.bfloat16
    assert all(e < 1e-2 for e in errs.values()), errs


@pytest.mark.parametrize("routing", ["sharp", "diffuse"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-Dk{}-D{}".format(*c))
def test_triton_matches_fp64_reference(case: tuple[int, int, int, int], routing: str) -> None:
    _check_against_fp64(case, routing, solve="queue")


PANEL_CASES = [pytest.param(c, r, id="B{}-T{}-Dk{}-D{}-{}".format(*c, r))
               for c in CASES for r in ("sharp", "diffuse")]


@pytest.mark.parametrize("case,routing", PANEL_CASES)
def test_triton_panel_matches_fp64_reference(case: tuple[int, int, int, int],
                                             routing: str) -> None:
    """The panel solves (default scratch budget: one super-chunk up to T = 4096, several at
    T = 32768)."""
    _check_against_fp64(case, routing, solve="panel")


@pytest.mark.parametrize("case,rows", [((2, 1000, 256, 256), 256), ((1, 4096, 1024, 1024), 1024),
                                       ((2, 65, 64, 200), 64)],
                         ids=["B2-T1000-W256", "B1-T4096-W1024", "B2-T65-W64"])
def test_triton_panel_several_superchunks(case: tuple[int, int, int, int], rows: int) -> None:
    _check_against_fp64(case, "sharp", solve="panel", panel_rows=rows)


@pytest.mark.parametrize("case,rows", [((2, 63, 64, 96), None), ((2, 1000, 256, 256), 256),
                                       ((2, 4096, 64, 128), None)],
                         ids=["B2-T63", "B2-T1000-W256", "B2-T4096"])
def test_triton_panel_fp32_scratch(case: tuple[int, int, int, int], rows: int | None) -> None:
    """SESSA_PANEL_SCRATCH=fp32: off-diagonal tiles in float32, past products in tf32."""
    _check_against_fp64(case, "sharp", solve="panel", panel_rows=rows, panel_scratch="fp32")


@pytest.mark.parametrize("P", [1, 1000, 32768])
def test_decode_step_gpu(P: int) -> None:
    gen = torch.Generator().manual_seed(P)
    B, Dk, D = 4, 1024, 1024
    q, g, f = torch.randn(B, Dk, generator=gen), torch.rand(B, generator=gen) * 2 - 1, \
        torch.randn(B, D, generator=gen)
    K, S = torch.randn(B, P, Dk, generator=gen), torch.randn(B, P, D, generator=gen)
    q, f, K, S = (x.cuda().bfloat16() for x in (q, f, K, S))
    g = g.cuda()
    out = feedback_decode_step(q, g, f, K, S)
    ref = feedback_decode_torch(q.double(), g.double(), f.double(), K.double(), S.double(),
                                Dk**-0.5)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
