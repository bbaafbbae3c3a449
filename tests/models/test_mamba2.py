"""Tests of the Mamba-2 mixer: chunked SSD vs the sequential scan, decoding vs the parallel
forward, gradients, the exponential memory of the SSM, FLOP accounting and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sessa_pt.models.mamba2 import (
    Mamba2Cache,
    Mamba2Mixer,
    segsum,
    ssd_chunked,
    ssd_sequential,
)

F64 = torch.float64


def ssd_inputs(b: int = 2, T: int = 37, H: int = 4, P: int = 3, G: int = 2, N: int = 5,
               seed: int = 0, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = 0.05 + 0.5 * torch.rand(b, T, H, generator=g, dtype=dtype)
    A = -(0.2 + 3.0 * torch.rand(H, generator=g, dtype=dtype))
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, h0


def small_mixer(impl: str = "chunked", seed: int = 0, **kw) -> Mamba2Mixer:
    torch.manual_seed(seed)
    args = {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4, "impl": impl}
    args.update(kw)
    return Mamba2Mixer(16, **args).to(F64)


# ------------------------------------------------------------------------------------------------
# SSD math


def test_segsum_values_and_no_overflow() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    s = segsum(a)
    for i in range(4):
        for j in range(4):
            want = a[j + 1:i + 1].sum().item() if j <= i else -math.inf
            assert s[i, j].item() == want
    big = -1e4 * torch.ones(64, dtype=torch.float32)      # long, strongly decaying segment
    e = torch.exp(segsum(big))
    assert torch.isfinite(e).all() and (e <= 1).all()


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 8, 37, 64])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_equals_sequential(chunk_size: int, groups: int, with_init: bool) -> None:
    x, dt, A, B, C, h0 = ssd_inputs(G=groups)
    h0 = h0 if with_init else None
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, chunk_size, initial_state=h0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=h0)
    assert y.shape == x.shape and s.shape == (2, 4, 3, 5)
    assert y.dtype == F64 and s.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def test_chunked_float32_and_final_state_dtype() -> None:
    x, dt, A, B, C, h0 = ssd_inputs(dtype=torch.float32)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, initial_state=h0)
    y, s = ssd_chunked(x, dt, A, B, C, 8, initial_state=h0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    yb, sb = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C)), 8)
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32


def test_ssd_split_sequence_carries_state() -> None:
    """Running T1 then T2 tokens from the first call's final state == one call over T1 + T2."""
    x, dt, A, B, C, h0 = ssd_inputs(T=30)
    y, s = ssd_chunked(x, dt, A, B, C, 8, initial_state=h0)
    y1, s1 = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 8, initial_state=h0)
    y2, s2 = ssd_chunked(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(s2, s, rtol=0, atol=1e-10)


def test_ssd_gradcheck() -> None:
    x, dt, A, B, C, h0 = ssd_inputs(b=1, T=6, H=2, P=2, G=1, N=2)
    args = [t.clone().requires_grad_() for t in (x, dt, A, B, C, h0)]

    def f(x, dt, A, B, C, h0):
        return ssd_chunked(x, dt, A, B, C, 4, initial_state=h0)

    assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------------------------------------
# The mixer


def test_chunked_forward_equals_sequential_forward() -> None:
    chunked = small_mixer("chunked")
    sequential = small_mixer("sequential")
    sequential.load_state_dict(chunked.state_dict())
    a = torch.randn(2, 23, 16, dtype=F64)
    y = chunked(a)
    assert y.shape == a.shape
    torch.testing.assert_close(y, sequential(a), rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_prefill_then_decode_equals_parallel(impl: str) -> None:
    m = small_mixer(impl)
    a = torch.randn(2, 21, 16, dtype=F64)
    full = m(a)
    cache = m.init_cache()
    assert isinstance(cache, Mamba2Cache) and cache.ssm_state is None
    outs = [m(a[:, :7], cache)]                            # prefill 7
    for t in range(7, 16):                                 # decode 9, one at a time
        outs.append(m(a[:, t:t + 1], cache))
    outs.append(m(a[:, 16:], cache))                       # multi-token continuation
    assert cache.length == 21
    assert cache.ssm_state.shape == (2, m.n_heads, m.head_dim, m.d_state)
    assert cache.conv_state.shape == (2, m.conv_dim, m.d_conv - 1)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)


def test_decode_from_first_token_and_kernel_one() -> None:
    m = small_mixer(d_conv=1)
    a = torch.randn(1, 6, 16, dtype=F64)
    cache = m.init_cache()
    steps = torch.cat([m(a[:, t:t + 1], cache) for t in range(6)], 1)
    torch.testing.assert_close(steps, m(a), rtol=0, atol=1e-10)


def test_backward_finite_and_reaches_every_parameter() -> None:
    m = Mamba2Mixer(32, d_state=16, head_dim=16, chunk_size=8)
    a = torch.randn(2, 19, 32, requires_grad=True)
    m(a).square().mean().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_mixer_gradcheck() -> None:
    torch.manual_seed(1)
    m = Mamba2Mixer(4, d_state=2, head_dim=4, expand=1, d_conv=2, chunk_size=2).to(F64)
    a = torch.randn(1, 5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (a,))


def test_initialisation() -> None:
    torch.manual_seed(0)
    m = Mamba2Mixer(256, head_dim=8, dt_min=1e-3, dt_max=1e-1)   # 64 heads
    dt = torch.nn.functional.softplus(m.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    A = torch.exp(m.A_log.detach())
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(m.D_skip.detach(), torch.ones(m.n_heads))
    for p in (m.A_log, m.dt_bias, m.D_skip):
        assert getattr(p, "_no_reinit", False)
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.conv1d.bias is not None
    E, D, N, H = m.d_inner, 256, m.d_state, m.n_heads
    expect = D * (2 * E + 2 * N + H) + (E + 2 * N) * (m.d_conv + 1) + 3 * H + E + E * D
    assert sum(p.numel() for p in m.parameters()) == expect


def test_influence_decays_exponentially() -> None:
    """|dy_t / da_tau| against lag is a straight line on log-linear axes (an exponential tail),
    clearly straighter than on log-log axes (which a power-law tail would give). dt_min is
    raised from the default so the slowest head decays visibly within 256 tokens."""
    torch.manual_seed(0)
    m = Mamba2Mixer(32, d_state=8, head_dim=8, chunk_size=64, dt_min=0.02, dt_max=0.1).to(F64)
    T = 256
    a = torch.randn(8, T, 32, dtype=F64, requires_grad=True)
    v = torch.randn(32, dtype=F64)
    (g,) = torch.autograd.grad((m(a)[:, -1] @ v).sum(), a)
    infl = g.norm(dim=-1).mean(0).flip(0)            # index = lag
    lag = torch.arange(16, 241, dtype=F64)
    logi = infl[16:241].log()

    def r2(X: torch.Tensor) -> tuple[float, float]:
        design = torch.stack([X, torch.ones_like(X)], 1)
        coef = torch.linalg.lstsq(design, logi.unsqueeze(1)).solution.squeeze(1)
        resid = logi - design @ coef
        return coef[0].item(), 1 - (resid.var() / logi.var()).item()

    slope, r2_exp = r2(lag)
    _, r2_pow = r2(lag.log())
    assert slope < -0.02
    assert r2_exp > 0.99 and r2_exp > r2_pow + 0.05
    assert infl[:4].min() > 1e3 * infl[200:].max()


# ------------------------------------------------------------------------------------------------
# FLOPs and arguments


@pytest.mark.parametrize("d_model,seq_len", [(64, 64), (64, 200), (128, 100), (256, 512),
                                             (128, 17)])
def test_flops_per_token_matches_flop_counter(d_model: int, seq_len: int) -> None:
    m = Mamba2Mixer(d_model, n_groups=2 if d_model > 64 else 1)
    a = torch.randn(1, seq_len, d_model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(a)
    measured = counter.get_total_flops() / seq_len
    assert m.flops_per_token(seq_len) == pytest.approx(measured, rel=0.05)


def test_flops_per_token_sequential() -> None:
    m = Mamba2Mixer(64, impl="sequential")
    a = torch.randn(1, 12, 64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(a)
    assert m.flops_per_token(12) == pytest.approx(counter.get_total_flops() / 12, rel=0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 48, "head_dim": 64}, "divisible by head_dim"),
    ({"d_model": 64, "head_dim": 32, "n_groups": 3}, "divisible by n_groups"),
    ({"d_model": 64, "impl": "mamba_ssm"}, "unknown Mamba2 impl"),
    ({"d_model": 64, "dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
    ({"d_model": 64, "chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"d_model": 64, "d_state": 0}, "d_state must be a positive integer"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    rest = {k: v for k, v in kwargs.items() if k != "d_model"}
    with pytest.raises(ValueError, match=match):
        Mamba2Mixer(kwargs["d_model"], **rest)


def test_ssd_shape_errors() -> None:
    x, dt, A, B, C, h0 = ssd_inputs()
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 8, initial_state=h0[:, :2])
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd_sequential(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1).contiguous(),
                       C[:, :, :1].expand(-1, -1, 3, -1).contiguous())


# ------------------------------------------------------------------------------------------------
# SSD path selection and the aligned in_proj


def test_resolve_ssd_impl() -> None:
    from sessa_pt.models.mamba2 import resolve_ssd_impl

    assert resolve_ssd_impl("auto", "cpu") == "chunked"
    assert resolve_ssd_impl("sequential", "cuda") == "sequential"
    assert resolve_ssd_impl("triton", "cuda") == "triton"
    for impl in ("triton", "fla"):
        with pytest.raises(ValueError, match="CUDA GPUs only"):
            resolve_ssd_impl(impl, "cpu")
    with pytest.raises(ValueError, match="unknown Mamba2 impl"):
        resolve_ssd_impl("mamba_ssm", "cpu")


def test_auto_impl_on_cpu_is_the_chunked_reference() -> None:
    a = torch.randn(2, 9, 16, dtype=F64)
    auto, ref = small_mixer("auto"), small_mixer("chunked")
    assert auto.ssd_path("cpu") == "chunked"
    assert torch.equal(auto(a), ref(a))


def test_triton_impl_rejects_chunk_size_it_cannot_tile() -> None:
    with pytest.raises(ValueError, match="power of two in 16..256"):
        small_mixer("triton", chunk_size=4)
    from sessa_pt.models.config import ModelConfig

    cfg = ModelConfig(mixer="mamba2", d_model=64)
    cfg.mamba2.impl, cfg.mamba2.chunk_size = "triton", 48
    with pytest.raises(ValueError, match="impl=triton needs chunk_size"):
        cfg.validate()


def test_padded_linear_equals_linear_and_is_aligned() -> None:
    from sessa_pt.models.mamba2 import padded_linear

    a = torch.randn(2, 5, 12, dtype=F64, requires_grad=True)
    w = torch.randn(37, 12, dtype=F64, requires_grad=True)   # odd width, like 3611 at d 864
    out = padded_linear(a, w, multiple=8)
    ref = torch.nn.functional.linear(a, w)
    assert out.shape == ref.shape and torch.allclose(out, ref)
    assert out.stride(-2) == 40                               # rows padded to 40
    g = torch.randn_like(ref)
    ga, gw = torch.autograd.grad(out, (a, w), g)
    ra, rw = torch.autograd.grad(ref, (a, w), g)
    assert torch.allclose(ga, ra) and torch.allclose(gw, rw)


@pytest.mark.parametrize("d_conv", [1, 4])
def test_shift_conv_equals_conv1d_forward_decode_and_grads(d_conv: int) -> None:
    """conv_impl="shifts" computes nn.Conv1d's causal depthwise conv: same outputs, gradients and
    decoding cache (prefill then one-token steps)."""
    a = torch.randn(2, 11, 16, dtype=F64)
    ref = small_mixer(d_conv=d_conv)
    sh = small_mixer(d_conv=d_conv, conv_impl="shifts")
    ya, yb = ref(a), sh(a)
    assert torch.allclose(ya, yb, atol=1e-12)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, p), q in zip(ref.named_parameters(), sh.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), n
    with torch.no_grad():
        cache = sh.init_cache()
        parts = [sh(a[:, :8], cache)] + [sh(a[:, t:t + 1], cache) for t in range(8, 11)]
    assert torch.allclose(torch.cat(parts, dim=1), ya, atol=1e-10)
    with pytest.raises(ValueError, match="unknown Mamba2 conv_impl"):
        small_mixer(conv_impl="cudnn")


@pytest.mark.parametrize("conv_impl", ["conv1d", "shifts"])
def test_parameters_are_used_through_module_calls(conv_impl: str) -> None:
    """in_proj and conv1d run as module calls on every path (ZeRO-3 gathers a module's
    parameters in its forward hooks; a bare ``.weight`` read would see an empty shard)."""
    m = small_mixer(conv_impl=conv_impl)
    seen = []
    for name in ("in_proj", "conv1d", "out_proj"):
        getattr(m, name).register_forward_pre_hook(lambda mod, args, n=name: seen.append(n))
    m(torch.randn(1, 6, 16, dtype=F64))
    assert seen == ["in_proj", "conv1d", "out_proj"]


def test_path_resolution_is_a_constant_under_compile() -> None:
    """Probing the installed packages for impl=auto on CUDA (imports, versions) must not break
    every compiled mixer's graph: dynamo takes the answer as a constant."""
    from torch._dynamo.utils import counters

    from sessa_pt.models.mamba2 import _checked_ssd_path, resolve_ssd_impl

    def f(x):
        p = resolve_ssd_impl("auto", torch.device("cuda"))
        q = _checked_ssd_path("auto", 64, torch.device("cuda"))
        return x + len(p) + len(q)

    torch._dynamo.reset()
    counters.clear()
    want = f(torch.zeros(2))
    assert torch.equal(torch.compile(f, backend="eager")(torch.zeros(2)), want)
    assert not counters["graph_break"]
