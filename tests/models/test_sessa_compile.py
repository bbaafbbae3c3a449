"""The Sessa feedback as PyTorch custom operators on the CPU: ``torch.library.opcheck`` on
every op (the Triton ones under Triton's interpreter), a torch.compile'd Sessa block (inductor's
C++ backend) equal to eager for the chunked and the Triton ops and for the decode step, the
fused routing projection (no width-1 GEMM), and per-block activation checkpointing (gradients
equal to the plain run)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sessa_pt.models import SessaBlock

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

F64 = torch.float64


def _inputs(B=2, T=20, DK=16, D=24, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, DK, generator=gen), torch.randn(B, T, DK, generator=gen)
    g = torch.rand(B, T, generator=gen) * 1.9 - 0.95
    f = torch.randn(B, T, D, generator=gen)
    return [x.to(dtype) for x in (q, k, g, f)]


def _grad_inputs(*xs):
    return [x.clone().requires_grad_() for x in xs]


def test_feedback_ops_pass_opcheck() -> None:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch) of
    every feedback op: the chunked ones, and the Triton ones (under the interpreter on CPU)."""
    pytest.importorskip("triton")
    from sessa_kernels.chunked import feedback_chunked_bwd, feedback_chunked_fwd

    q, k, g, f = _inputs(dtype=F64)
    torch.library.opcheck(feedback_chunked_fwd, (*_grad_inputs(q, k, g, f), 0.25, 8))
    s, lse, r = feedback_chunked_fwd(q, k, g, f, 0.25, 8)
    torch.library.opcheck(feedback_chunked_bwd, (q, k, g, s, lse, r, torch.randn_like(s),
                                                 0.25, 8))
    from sessa_kernels.decode import feedback_decode_triton
    from sessa_kernels.triton_feedback import feedback_triton_bwd, feedback_triton_fwd

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, g, f = (x.to(dev) for x in _inputs(T=20, D=16))
    settings = (0.25, 16, 16, "ieee", "panel", 256.0, 16)
    torch.library.opcheck(feedback_triton_fwd, (*_grad_inputs(q, k, g, f), *settings))
    s, lse, r = feedback_triton_fwd(q, k, g, f, *settings)
    torch.library.opcheck(feedback_triton_bwd, (q, k, g, s, lse, r, torch.randn_like(s),
                                                *settings))
    K, S = torch.randn(2, 70, 16, device=dev), torch.randn(2, 70, 16, device=dev)
    torch.library.opcheck(feedback_decode_triton, (q[:, 0], g[:, 0], f[:, 0], K, S, 0.25))


def _block(impl: str, seed: int = 0, **kw) -> SessaBlock:
    torch.manual_seed(seed)
    return SessaBlock(32, 4, impl=impl, chunk_size=16, **kw)


def _fwd_bwd(block, x):
    x = x.clone().requires_grad_()
    y = block(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    return [y.detach(), x.grad, *grads]


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_compiled_sessa_block_equals_eager(impl: str) -> None:
    """fwd + bwd of a torch.compile'd gated Sessa block (the feedback op opaque inside the
    compiled graph) against the eager block: output, input gradient and every parameter's
    gradient. The strided q_b / k_b views of the fused projection reach the op as they are."""
    if impl == "triton":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    block = _block(impl)
    x = torch.randn(2, 24 if impl == "triton" else 40, 32,
                    generator=torch.Generator().manual_seed(1))
    eager = _fwd_bwd(block, x)
    # inductor (C++ on CPU) once; the Triton variant through dynamo + AOTAutograd only (the
    # fake implementation and the registered backward, without a second C++ build).
    compiled = torch.compile(block, backend="inductor" if impl == "chunked" else "aot_eager")
    got = _fwd_bwd(compiled, x)
    for a, b in zip(got, eager, strict=True):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (a - b).abs().max()
    dense = _fwd_bwd(_block("dense"), x)
    for a, b in zip(eager, dense, strict=True):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (a - b).abs().max()


def test_compiled_decode_step_equals_eager() -> None:
    """Prefill, then single-token steps of the recurrent decode (the Triton read op under the
    interpreter on CPU) through a compiled block: equal to the eager block's steps."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    block = _block("triton").eval()
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(block, backend="aot_eager")
    with torch.no_grad():
        outs = {}
        for name, fn in (("eager", block), ("compiled", compiled)):
            cache = block.init_cache()
            ys = [fn(x[:, :8], cache)]
            ys += [fn(x[:, t:t + 1], cache) for t in range(8, 12)]
            outs[name] = torch.cat(ys, 1)
        full = block(x)
    assert torch.allclose(outs["compiled"], outs["eager"], atol=1e-5)
    assert torch.allclose(outs["eager"], full, atol=1e-4)


class _MatmulShapes(TorchDispatchMode):
    """Records the (m, k, n) of every GEMM dispatched (mm, addmm, bmm, baddbmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            self.shapes.append((a.shape[-2], a.shape[-1], b.shape[-1]))
        return func(*args, **(kwargs or {}))


def test_sessa_block_runs_no_narrow_gemm() -> None:
    """Forward and backward of a Sessa block: every GEMM has all of m, k, n >= 8 and n a
    multiple of 8. The gain's D -> 1 projection used to run as a width-1 GEMM (and its
    backward as a K = 1 one): cuBLAS's alignment-1 kernels, 12.5% of the H200 step."""
    block = _block("chunked")
    x = torch.randn(2, 16, 32, requires_grad=True)
    rec = _MatmulShapes()
    with rec:
        block(x).sum().backward()
    assert rec.shapes
    narrow = [s for s in rec.shapes if min(s) < 8 or s[2] % 8]
    assert not narrow, narrow


def test_fused_routing_projection_equals_separate_projections() -> None:
    m = _block("chunked").mixer.double()
    a = torch.randn(2, 9, 32, dtype=F64)
    q_b, k_b, gamma = m.feedback_inputs(a)
    q_ref, k_ref = m.proj_fb(a).split(m.fb_dim, -1)
    assert torch.allclose(q_b, q_ref, atol=1e-12) and torch.allclose(k_b, k_ref, atol=1e-12)
    assert torch.allclose(gamma, m.gamma(a), atol=1e-12)
    assert m.routing_projection(a).shape[-1] == 2 * m.fb_dim + 8


def _stage_grads(checkpoint_blocks: bool, compile_blocks: bool = False, dtype=F64):
    from sessa_pt.models.config import ModelConfig, SessaOptions
    from sessa_pt.parallel.model import Stage

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                      sessa=SessaOptions(impl="chunked", chunk_size=8))
    stages = [Stage(cfg, i, 3, 1, 1, compile_blocks, checkpoint_blocks) for i in range(4)]
    for s in stages[1:3]:
        if s._compiled is not None:     # the cheap backend: this tests the composition
            object.__setattr__(s, "_compiled", torch.compile(s.m, backend="aot_eager"))
    for s in stages:
        s.to(dtype)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = stages[0](ids)
        for s in stages[1:3]:
            h = s(h)
        loss = stages[3].m(h, stages[0].m.weight).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for s in stages for n, p in s.named_parameters(prefix=s.plain_prefix)}
    return loss.detach(), grads, sum(packed)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """train.activation_checkpointing=blocks: the same loss and gradients (float64, exactly)
    with far fewer activations kept by the forward."""
    loss, grads, kept = _stage_grads(False)
    loss_c, grads_c, kept_c = _stage_grads(True)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys()
    for name, g in grads.items():
        assert torch.allclose(g, grads_c[name], atol=1e-12, rtol=1e-10), name
    assert kept_c < kept / 3, (kept_c, kept)


def test_activation_checkpointing_with_compiled_blocks() -> None:
    """Also from a cold RoPE cache: a first trace that built the table inside its graph saved
    other tensors than the recompute's trace (which reads it), a CheckpointError on the GPU."""
    from sessa_pt.models import rope

    torch._dynamo.reset()
    loss, grads, _ = _stage_grads(False, dtype=torch.float32)
    rope._TABLES.clear()
    loss_c, grads_c, _ = _stage_grads(True, compile_blocks=True, dtype=torch.float32)
    assert torch.allclose(loss, loss_c, atol=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, grads_c[name], atol=1e-5, rtol=1e-4), name
