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


@pytest.mark.parametrize("case,routing,kw", [
    ((2, 63, 64, 96), "sharp", {}), ((1, 4096, 1024, 1024), "sharp", {}),
    ((1, 4096, 1024, 1024), "diffuse", {}), ((2, 1000, 256, 256), "sharp", {"panel_rows": 256}),
    ((2, 1000, 256, 256), "sharp", {"block_m": 16}),
    ((2, 1000, 256, 256), "sharp", {"block_m": 128})],
    ids=["B2-T63", "B1-T4096-sharp", "B1-T4096-diffuse", "B2-T1000-W256", "bm16", "bm128"])
def test_triton_panel_inverse_matches_fp64_reference(case, routing: str, kw: dict) -> None:
    """solve="panel_inverse": the in-chunk inverses formed in the parallel pass (tf32
    products) keep every error within the bf16 bound of the doubling."""
    _check_against_fp64(case, routing, solve="panel_inverse", **kw)


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_triton_other_chunk_sizes(block_m: int) -> None:
    """model.sessa.chunk_size = block_m (64, the default, is every case above)."""
    for solve in ("panel", "queue"):
        _check_against_fp64((2, 1000, 256, 256), "sharp", solve=solve, block_m=block_m)


def test_compiled_feedback_on_strided_views_matches_fp64() -> None:
    """The custom ops inside a torch.compile'd function whose q_b / k_b / gamma are strided
    slices of one fused projection output (as in SessaMixer), at an odd storage offset: the
    layout inductor hands the op must not matter (the old crash: misaligned address)."""
    from sessa_kernels.triton_feedback import feedback_triton

    B, T, Dk, D = 2, 1000, 256, 256
    q, k, g, f, ds = feedback_inputs(B, T, Dk, D, routing="sharp", dtype=torch.bfloat16,
                                     device="cuda", seed=7)
    fused = torch.cat([torch.zeros(B, T, 1, device="cuda", dtype=torch.bfloat16), q, k,
                       g[..., None], torch.zeros(B, T, 7, device="cuda", dtype=torch.bfloat16)],
                      -1)

    def fn(h, f):
        return feedback_triton(h[..., 1:1 + Dk], h[..., 1 + Dk:1 + 2 * Dk], h[..., 1 + 2 * Dk],
                               f)

    compiled = torch.compile(fn)
    h = fused.clone().requires_grad_()
    f_leaf = f.clone().requires_grad_()
    s = compiled(h, f_leaf)
    dh, df = torch.autograd.grad(s, (h, f_leaf), ds)
    got = [s, dh[..., 1:1 + Dk], dh[..., 1 + Dk:1 + 2 * Dk], dh[..., 1 + 2 * Dk], df]
    ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
    errs = {n: rel_err(x, r) for n, x, r in zip(NAMES, got, ref, strict=True)}
    print("compiled strided", errs)
    assert all(e < 1e-2 for e in errs.values()), errs


def test_ops_pass_opcheck_on_gpu() -> None:
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of the
    three Triton custom operators on bf16 CUDA tensors with the default block sizes."""
    from sessa_kernels.decode import feedback_decode_triton
    from sessa_kernels.triton_feedback import feedback_triton_bwd, feedback_triton_fwd

    q, k, g, f, ds = feedback_inputs(2, 300, 128, 192, routing="diffuse", dtype=torch.bfloat16,
                                     device="cuda", seed=11)
    for solve in ("panel", "panel_inverse", "queue"):
        settings = (128**-0.5, 64, 128, "tf32", solve, 256.0, 0)
        leaves = [x.clone().requires_grad_() for x in (q, k, g, f)]
        torch.library.opcheck(feedback_triton_fwd, (*leaves, *settings))
        s, lse, r = feedback_triton_fwd(q, k, g, f, *settings)
        torch.library.opcheck(feedback_triton_bwd, (q, k, g, s, lse, r, ds, *settings))
    torch.library.opcheck(feedback_decode_triton, (q[:, 0], g[:, 0], f[:, 0], k, s, 0.1))


def _sessa_block(**kw):
    from sessa_pt.models.blocks import SessaBlock

    torch.manual_seed(0)
    return SessaBlock(256, 4, impl="triton", **kw).cuda().to(torch.bfloat16)


@pytest.mark.parametrize("solve", ["panel", "panel_inverse", "queue"])
def test_compiled_sessa_block_matches_eager_bf16(solve: str) -> None:
    """fwd + bwd of a torch.compile'd gated Sessa block (inductor; the feedback ops opaque)
    against the same block eager, and both against an fp64 copy (dense solve): output, input
    gradient and every parameter gradient of the compiled block as close to fp64 as the eager
    block's (bf16 tolerance)."""
    block = _sessa_block(solve=solve)
    ref64 = _sessa_block(solve=solve).double()
    ref64.mixer.impl = "dense"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 512, 256, generator=gen).cuda().bfloat16()
    dy = torch.randn(4, 512, 256, generator=gen).cuda().bfloat16()

    def run(module, dtype):
        xi = x.detach().to(dtype).clone().requires_grad_()    # a fresh leaf per run
        y = module(xi)
        y.backward(dy.to(dtype))
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        return out

    eager, compiled = run(block, torch.bfloat16), run(torch.compile(block), torch.bfloat16)
    ref = run(ref64, torch.float64)
    names = ["y", "dx"] + [n for n, _ in block.named_parameters()]
    for name, e, c, r in zip(names, eager, compiled, ref, strict=True):
        er, cr = rel_err(e, r), rel_err(c, r)
        print(name, f"eager {er:.2e} compiled {cr:.2e} vs fp64")
        assert cr < 2 * er + 5e-3, (name, er, cr)       # compiled as accurate as eager
    assert rel_err(compiled[0], eager[0]) < 1e-2 and rel_err(compiled[1], eager[1]) < 2e-2


def test_compiled_decode_steps_match_eager() -> None:
    """Prefill then 8 single-token steps through a torch.compile'd block (the Triton read op
    inside the compiled step) equal the eager steps and the parallel forward."""
    block = _sessa_block().eval()
    x = torch.randn(2, 72, 256, generator=torch.Generator().manual_seed(3)).cuda().bfloat16()
    compiled = torch.compile(block)
    outs = {}
    with torch.no_grad():
        for name, fn in (("eager", block), ("compiled", compiled)):
            cache = block.init_cache()
            ys = [fn(x[:, :64], cache)] + [fn(x[:, t:t + 1], cache) for t in range(64, 72)]
            outs[name] = torch.cat(ys, 1)
        full = block(x)
    assert rel_err(outs["compiled"], outs["eager"]) < 1e-2
    assert rel_err(outs["eager"], full) < 2e-2


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
