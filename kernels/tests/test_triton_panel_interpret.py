"""The panel variant of the Triton solves (the default; ``solve="panel"``) on tiny shapes:
against the float64 dense reference and against the queue solves (``solve="queue"``). Without
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


@pytest.mark.parametrize("T,solve", [(T, "panel") for T in (1, 2, 63, 64, 65, 200)]
                         + [(T, "panel_inverse") for T in (1, 65, 200)])
@pytest.mark.parametrize("routing", ["sharp", "diffuse"])
def test_panel_tiny_matches_dense(T: int, routing: str, solve: str) -> None:
    """16-row chunks, 16-channel blocks and super-chunks of 32 rows: from T = 63 on, several
    super-chunks (the last one partial) each with several chunks and channel blocks; the
    in-chunk systems by doubling and by the inverse formed in the parallel pass."""
    q, k, g, f, ds = feedback_inputs(2, T, 16, 24, routing=routing, dtype=torch.float32,
                                     device=DEV, seed=T)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, block_d=16, solve=solve,
                                                     panel_rows=32), q, k, g, f, ds)
    for name, x, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(x, r) < TOL, name


def test_panel_inverse_128_row_chunks_match_dense() -> None:
    """128-row chunks (model.sessa.chunk_size=128), two chunks and a partial third: the
    in-chunk inverse at its largest tile, against the float64 dense reference and the
    doubling."""
    q, k, g, f, ds = feedback_inputs(1, 300, 32, 40, routing="diffuse", dtype=torch.float32,
                                     device=DEV, seed=7)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    outs = {solve: value_and_grads(lambda *a, solve=solve: feedback_triton(
        *a, block_m=128, solve=solve), q, k, g, f, ds) for solve in ("panel", "panel_inverse")}
    for name, x, xd, r in zip(NAMES, outs["panel_inverse"], outs["panel"], ref, strict=True):
        assert rel_err(x, r) < TOL, name
        assert rel_err(x, xd) < TOL, name


@pytest.mark.parametrize("gemm_rows", [32, 48])
def test_dq_dk_gemm_blocks_match_dense(monkeypatch, gemm_rows: int) -> None:
    """dq and dk by GEMMs of each dlogit panel: the columns before it at once, its diagonal part
    by row blocks (blocks that divide the 64-row panels and blocks that do not), 4 panels."""
    from sessa_kernels import triton_feedback as tf

    monkeypatch.setattr(tf, "GEMM_ROWS", gemm_rows)
    q, k, g, f, ds = feedback_inputs(2, 200, 16, 24, routing="sharp", dtype=torch.float32,
                                     device=DEV, seed=5)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, block_d=16,
                                                     panel_rows=64), q, k, g, f, ds)
    for name, x, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(x, r) < TOL, name


def _fp16_errors(**kw) -> dict[str, float]:
    """Relative errors against float64 of the solve on float16 inputs (the interpreter's dot
    does not take bfloat16; float16 rounds s, u and the panel tiles the same way, 8x finer):
    sharp routing, 4 chunks of 16 rows, 2 super-chunks of 32, 6 channel blocks. In-chunk
    products in full float32 ("ieee"; on the GPU tf32 would dominate float16's rounding)."""
    q, k, g, f, ds = feedback_inputs(2, 63, 64, 96, routing="sharp", dtype=torch.float16,
                                     device=DEV, seed=159)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    out = value_and_grads(lambda *a: feedback_triton(*a, block_m=16, block_d=16, panel_rows=32,
                                                     precision="ieee", **kw), q, k, g, f, ds)
    return {n: rel_err(x, r) for n, x, r in zip(NAMES, out, ref, strict=True)}


def test_half_precision_accuracy_panel_and_queue() -> None:
    """Half-precision inputs, sharp routing: both solves within float16 accuracy of the
    float64 reference and of each other. r and dgamma come from s and u as stored (rounded), so
    the dlogit rows that the dq/dk kernel forms from the stored values sum to zero: dq_b and
    dk_b ~5e-4 here (4.4e-4 with a float32 dlogit; the GEMMs take it in the input dtype),
    where r and dgamma from the float32 s and u (the old kernels) gave ~1.1e-3
    (kernels/NOTES.md, "Panel precision")."""
    queue = _fp16_errors(solve="queue")
    for solve in ("panel", "panel_inverse"):
        panel = _fp16_errors(solve=solve)
        for name in NAMES:
            assert panel[name] < 2e-3 and queue[name] < 2e-3, (solve, name, panel, queue)
            assert abs(panel[name] - queue[name]) < 0.25 * queue[name] + 1e-4, \
                (solve, name, panel, queue)
        bound = 6e-4 if DEV == "cpu" else 3e-3    # GPU: the dq/dk products add tf32 rounding
        for name in ("dq_b", "dk_b"):
            assert max(panel[name], queue[name]) < bound, (solve, name, panel, queue)


@pytest.mark.parametrize("T", [65, 200])
def test_panel_equals_queue_default_blocks(T: int) -> None:
    """Default blocks (64-row chunks), panel (the default) against solve="queue", with one
    super-chunk (default budget: W = T_pad) and W = 64 (one chunk per super-chunk)."""
    q, k, g, f, ds = feedback_inputs(1, T, 32, 40, routing="sharp", dtype=torch.float32,
                                     device=DEV, seed=T + 1)
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    queue = value_and_grads(lambda *a: feedback_triton(*a, solve="queue"), q, k, g, f, ds)
    for rows, solve in ((None, "panel"), (64, "panel"), (None, "panel_inverse")):
        out = value_and_grads(lambda *a, rows=rows, solve=solve: feedback_triton(
            *a, panel_rows=rows, solve=solve), q, k, g, f, ds)
        for name, x, xq, r in zip(NAMES, out, queue, ref, strict=True):
            assert rel_err(x, r) < TOL, (name, rows, solve)
            assert rel_err(x, xq) < TOL, (name, rows, solve)


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
    with pytest.raises(ValueError, match="panel_mib"):
        feedback_triton(q, k, g, f, panel_mib=0)
    with pytest.raises(ValueError, match="block_m"):
        feedback_triton(q, k, g, f, block_m=48)


def test_panel_width_bound() -> None:
    """W: a multiple of block_m in [block_m, T_pad], the scratch within panel_mib."""
    assert panel_width(2, 8192, 64, 2) == 7680          # 256 MiB / (2 * 8192 * 2.125 B)
    assert panel_width(1, 32768, 64, 2) == 3840
    assert panel_width(1, 131072, 64, 2) == 960
    assert panel_width(8, 2048, 64, 2) == 2048          # everything fits: W = T
    assert panel_width(1, 100, 64, 2) == 128            # T rounded up to the chunk
    assert panel_width(1, 1 << 24, 64, 2) == 64         # never below one chunk
    assert panel_width(1, 1000, 16, 4, panel_rows=40) == 32
    assert panel_width(1, 32768, 64, 4) == 1984         # float32 inputs: about half
    assert panel_width(1, 32768, 64, 2, panel_mib=64) == 960
    for B, T in ((2, 8192), (1, 32768), (1, 131072)):
        W = panel_width(B, T, 64, 2, panel_mib=64)
        assert B * W * T * (2 + 8 / 64) <= 64 * 2**20


def test_dq_dk_single_panel_is_two_gemms_without_a_float32_dk() -> None:
    """When one panel holds every row, dq and dk are one product each in the input dtype: equal
    to the panel-by-panel products (4 panels) and no float32 (B, T, Dk) buffer is made."""
    from sessa_kernels import triton_feedback as tf
    from torch.utils._python_dispatch import TorchDispatchMode

    B, T, DK = 2, 100, 16
    q, k, g, f, _ = feedback_inputs(B, T, DK, 24, routing="sharp", dtype=torch.float32,
                                    device=DEV, seed=11)
    q, k = q.contiguous(), k.contiguous()
    settings = (DK**-0.5, 16, 16, "ieee", "panel", 256.0)
    s, lse, r = tf.feedback_triton_fwd(q, k, g, f, *settings, 0)
    u = torch.randn_like(s)
    dg = (u * r).sum(-1)

    class Float32Buffers(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.empty.memory_format) \
                    and out.dtype == torch.float32:
                self.shapes.append(tuple(out.shape))
            return out

    def dq_dk(rows: int):
        cfg = tf._cfg(*settings, rows, torch.float32)
        return tf._dq_dk(q, k, g, u, s, lse, dg, cfg, BK=16)

    with Float32Buffers() as mode:
        one = dq_dk(0)                                   # default budget: one panel of 112 rows
    assert (B, T, DK) not in mode.shapes, mode.shapes
    four = dq_dk(32)                                     # 32-row panels
    for a, b in zip(one, four, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
