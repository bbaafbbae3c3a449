"""The Triton SSD (``sessa_kernels.ssd_triton``) against the plain PyTorch reference
``ssd_chunked`` in float64: outputs, final state and the gradients of x, dt, A, B, C and the
initial state. Without CUDA the kernels run under Triton's interpreter on tiny fp32 shapes
(IEEE products: tight tolerance); the ``gpu`` tests run bf16 inputs at m125 shapes."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from _helpers import rel_err
from sessa_kernels.ssd_triton import ssd_triton

from sessa_pt.models.mamba2 import ssd_chunked

NAMES = ("y", "final", "dx", "ddt", "dA", "dB", "dC", "dinit")


def _inputs(b, T, H, P, G, N, *, dtype, device, seed=0, with_init=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = 0.05 + 0.5 * torch.rand(b, T, H, generator=g)
    A = -(0.2 + 3.0 * torch.rand(H, generator=g))
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g) if with_init else None
    gy = torch.randn(b, T, H, P, generator=g)
    gf = torch.randn(b, H, P, N, generator=g)
    cast = [x.to(dtype), dt, A, B.to(dtype), C.to(dtype), h0]
    return [None if v is None else v.to(device) for v in cast], gy.to(device), gf.to(device)


def _value_and_grads(fn, ins, gy, gf, chunk_size, dtype=None):
    leaves = [None if v is None else
              (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_()
              for v in ins]
    y, final = fn(*leaves[:5], chunk_size, initial_state=leaves[5])
    loss = (y * gy.to(y.dtype)).sum() + (final * gf.to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, [v for v in leaves if v is not None])
    return [y.detach(), final.detach(), *grads]


@pytest.mark.parametrize("T,groups,with_init", [(1, 1, False), (16, 2, True), (37, 1, True),
                                                (37, 2, False)])
def test_triton_ssd_matches_reference_fp32(T: int, groups: int, with_init: bool) -> None:
    """Several chunks of 16 (T = 37 leaves a ragged last one), P and N not powers of two."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ins, gy, gf = _inputs(2, T, 4, 8, groups, 12, dtype=torch.float32, device=dev, seed=T,
                          with_init=with_init)
    out = _value_and_grads(ssd_triton, ins, gy, gf, 16)
    ref = _value_and_grads(ssd_chunked, ins, gy, gf, 16, dtype=torch.float64)
    names = [n for n in NAMES if with_init or n != "dinit"]
    tol = 1e-5 if dev == "cpu" else 2e-3
    for name, o, r in zip(names, out, ref, strict=True):
        assert o.shape == r.shape, name
        assert rel_err(o, r) < tol, (name, rel_err(o, r))


def test_triton_ssd_strided_views_and_dtypes() -> None:
    """x, B, C as views of one wide buffer (the mixer's split of in_proj output), as in
    training; results keep x's dtype, the final state is float32."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, T, H, P, G, N = 1, 20, 2, 16, 1, 16
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(b, T, H * P + 2 * G * N + 3, generator=g).to(dev)
    x = buf[..., :H * P].view(b, T, H, P)
    B = buf[..., H * P:H * P + G * N].view(b, T, G, N)
    C = buf[..., H * P + G * N:H * P + 2 * G * N].view(b, T, G, N)
    dt = (0.1 + torch.rand(b, T, H, generator=g)).to(dev)
    A = -torch.ones(H, device=dev)
    y, final = ssd_triton(x, dt, A, B, C, 16)
    yr, fr = ssd_chunked(*(v.double() for v in (x, dt, A, B, C)), 16)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    tol = 1e-5 if dev == "cpu" else 2e-3
    assert rel_err(y, yr) < tol and rel_err(final, fr) < tol


@pytest.mark.parametrize("chunk_size", [8, 48, 512])
def test_triton_ssd_rejects_bad_chunk_size(chunk_size: int) -> None:
    ins, _, _ = _inputs(1, 4, 2, 4, 1, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="power of two in 16..256"):
        ssd_triton(*ins[:5], chunk_size)


# ---- GPU: bf16 at the m125 shapes -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", [(2, 2048, 27, 64, 1, 64), (1, 4100, 8, 64, 2, 128)])
def test_triton_ssd_bf16_gpu(case) -> None:
    """bf16 operands with fp32 accumulation against the float64 reference on the bf16-rounded
    inputs; the relative errors are those of bf16 products (~1e-2)."""
    b, T, H, P, G, N = case
    ins, gy, gf = _inputs(b, T, H, P, G, N, dtype=torch.bfloat16, device="cuda", seed=T)
    ins[1] = 0.001 + 0.1 * torch.rand_like(ins[1])          # dt of an initialised mixer
    out = _value_and_grads(ssd_triton, ins, gy, gf, 64)
    ref = _value_and_grads(ssd_chunked, ins, gy, gf, 64, dtype=torch.float64)
    # the log-decay gradients sum many terms of both signs: looser than the rest
    loose = {"ddt": 5e-2, "dA": 5e-2}
    for name, o, r in zip(NAMES, out, ref, strict=True):
        assert rel_err(o, r) < loose.get(name, 2.5e-2), (name, rel_err(o, r))


# (d_model, batch, T, mixer options): two groups over a ragged last chunk; and the trainer
# test's odd-head model (3 heads of 32, d_state 16, in_proj width 227)
MIXER_CASES = [(16, 2, 21, {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 16}),
               (48, 4, 128, {"d_state": 16, "head_dim": 32, "chunk_size": 64})]


@pytest.mark.parametrize("case", range(len(MIXER_CASES)))
@pytest.mark.parametrize("conv_impl", ["conv1d", "shifts"])
def test_mixer_on_triton_ssd_matches_chunked(monkeypatch, conv_impl: str, case: int) -> None:
    """The whole Mamba2 mixer with the Triton SSD (the x/B/C views its conv makes, in either
    layout) against the same mixer on the PyTorch SSD: output and every parameter gradient.
    On CPU the mixer refuses impl=triton, so the path resolution is forced here."""
    from sessa_pt.models import mamba2

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(mamba2, "resolve_ssd_impl", lambda impl, device: impl)
    torch.manual_seed(0)
    d_model, batch, T, kw = MIXER_CASES[case]
    kw = {**kw, "conv_impl": conv_impl}
    fast = mamba2.Mamba2Mixer(d_model, impl="triton", **kw).to(dev)
    ref = mamba2.Mamba2Mixer(d_model, impl="chunked", **kw).to(dev)
    ref.load_state_dict(fast.state_dict())
    a = torch.randn(batch, T, d_model, device=dev)
    outs = []
    for m in (fast, ref):
        y = m(a)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    tol = 5e-5 if dev == "cpu" else 2e-3      # float32 sums over b T H in another order
    assert rel_err(outs[0][0], outs[1][0]) < tol
    for name, g in outs[1][1].items():
        assert rel_err(outs[0][1][name], g) < tol, name
    if dev == "cuda":   # the trainer's precision: bf16 weights and activations
        fast = fast.to(torch.bfloat16)
        fast.zero_grad()
        y = fast(a.to(torch.bfloat16))
        y.float().square().sum().backward()
        torch.cuda.synchronize()
        assert rel_err(y.float(), outs[1][0]) < 3e-2
        for name, p in fast.named_parameters():
            assert rel_err(p.grad.float(), outs[1][1][name]) < 6e-2, name


def test_ssd_ops_pass_opcheck() -> None:
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) of
    both SSD operators, with and without an initial state and a final-state gradient."""
    from sessa_kernels.ssd_triton import ssd_triton_bwd, ssd_triton_fwd

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    (x, dt, A, B, C, h0), _, _ = _inputs(1, 20, 2, 8, 1, 8, dtype=torch.float32, device=dev)
    L = 16
    dt_p = torch.nn.functional.pad(dt, (0, 0, 0, 32 - 20)).transpose(1, 2).contiguous()
    acum = (dt_p * A[:, None]).view(1, 2, 2, L).cumsum(-1).view(1, 2, 32)
    for init, dfinal in ((h0, torch.randn_like(h0)), (None, None)):
        args = [t.detach().clone().requires_grad_() for t in (x, dt_p, acum, B, C)]
        torch.library.opcheck(ssd_triton_fwd, (*args, init, L))
        _, _, states = ssd_triton_fwd(x, dt_p, acum, B, C, init, L)
        torch.library.opcheck(ssd_triton_bwd, (x, dt_p, acum, B, C, states,
                                               torch.randn_like(x), dfinal, L))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_mixer_is_one_graph_around_the_triton_ssd(monkeypatch, backend: str) -> None:
    """The SSD's kernels are custom operators: the compiled mixer is one graph (fullgraph), and
    gives the eager mixer's output and gradients (inductor: its C++ backend on CPU)."""
    from sessa_pt.models import mamba2

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(mamba2, "resolve_ssd_impl", lambda impl, device: impl)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = mamba2.Mamba2Mixer(16, d_state=8, head_dim=8, chunk_size=16, impl="triton").to(dev)
    a = torch.randn(1, 20, 16, device=dev, requires_grad=True)
    ref = m(a)
    ga, *gp = torch.autograd.grad(ref.square().sum(), [a, *m.parameters()])
    out = torch.compile(m, backend=backend, fullgraph=True)(a)
    gb, *gq = torch.autograd.grad(out.square().sum(), [a, *m.parameters()])
    tol = 1e-5 if dev == "cpu" else 2e-3
    assert rel_err(out, ref) < tol and rel_err(gb, ga) < tol
    for (name, _), x, r in zip(m.named_parameters(), gq, gp, strict=True):
        assert rel_err(x, r) < tol, name
