"""The Sessa layer against docs/model.md: §5's numbers, the first token, decoding,
gradients, dtypes, and import of reference-release weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sessa_pt.eval.memory_tail import uniform_routing_closed_form, uniform_routing_influence
from sessa_pt.models import SessaBlock, SessaMixer, feedback_dense
from sessa_pt.models.rope import apply_rope

F64 = torch.float64

SPEC_TABLE = {  # gamma -> {lag: influence} for tau = 0 (docs/model.md §5)
    0.5: {1: 0.5, 2: 0.375, 4: 0.2734375, 16: 0.139950, 64: 0.0703861, 256: 0.0352446,
          1024: 0.0176288, 4096: 0.00881519},
    0.9: {1: 0.9, 2: 0.855, 4: 0.805838, 16: 0.707213, 64: 0.616951, 256: 0.537369,
          1024: 0.467869, 4096: 0.407317},
}


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_uniform_routing_impulse_response_matches_spec_table(gamma):
    infl = uniform_routing_influence(gamma, 4097, tau=0)
    for lag, want in SPEC_TABLE[gamma].items():
        assert infl[lag] == pytest.approx(want, abs=1e-6), lag
    lags = [1, 2, 4, 16, 64, 256, 1024, 4096]
    closed = uniform_routing_closed_form(gamma, 0, lags)
    assert max(abs(infl[lag] - c) / c for lag, c in zip(lags, closed)) < 1e-10


def test_uniform_routing_with_offset_source():
    infl = uniform_routing_influence(0.5, 1011, tau=10)
    assert infl[1] == pytest.approx(0.0454545, abs=1e-6)
    assert infl[100] == pytest.approx(0.0145217, abs=1e-6)
    assert infl[1000] == pytest.approx(0.00479725, abs=1e-7)


def test_internal_positional_code():
    T = 12
    z = torch.zeros(1, T, 1, dtype=F64)
    c = feedback_dense(z, z, torch.full((1, T), 0.5, dtype=F64), torch.ones(1, T, 1, dtype=F64))
    c = c[0, :, 0]
    want = [1.0]
    for t in range(1, T):
        want.append(1 + 0.5 / t * sum(want))
    assert torch.allclose(c, torch.tensor(want, dtype=F64), atol=1e-14)
    assert c[:6].tolist() == pytest.approx([1, 1.5, 1.625, 1.6875, 1.7265625, 1.75390625])
    assert bool((c[1:] > c[:-1]).all())


def test_first_token_has_no_past_and_no_nan():
    torch.manual_seed(0)
    m = SessaMixer(16, 2).double()
    a = torch.randn(2, 5, 16, dtype=F64, requires_grad=True)
    s = m(a)
    f = m.out_proj(m.attend(a)[0])
    assert torch.isfinite(s).all()
    assert torch.allclose(s[:, 0], f[:, 0], atol=1e-15, rtol=0)   # s_0 = f_0
    s.sum().backward()
    assert torch.isfinite(a.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    one = m(a[:, :1])                               # a sequence of one token
    assert torch.allclose(one[:, 0], f[:, 0], atol=1e-15, rtol=0)


def test_feedback_recursion_equals_its_definition():
    torch.manual_seed(1)
    B, T, Dk, D = 2, 9, 6, 5
    q, k = torch.randn(B, T, Dk, dtype=F64), torch.randn(B, T, Dk, dtype=F64)
    g = torch.empty(B, T, dtype=F64).uniform_(-0.99, 0.99)
    f = torch.randn(B, T, D, dtype=F64)
    s = feedback_dense(q, k, g, f)
    ref = torch.zeros_like(f)
    for b in range(B):
        for t in range(T):
            ref[b, t] = f[b, t]
            if t:
                alpha = torch.softmax(q[b, t] @ k[b, :t].T / math.sqrt(Dk), dim=0)
                ref[b, t] += g[b, t] * (alpha @ ref[b, :t])
    assert torch.allclose(s, ref, atol=1e-12)


def test_stability_bound():
    torch.manual_seed(2)
    q, k = torch.randn(1, 300, 8, dtype=F64) * 3, torch.randn(1, 300, 8, dtype=F64) * 3
    g = torch.full((1, 300), 0.95, dtype=F64)
    f = torch.rand(1, 300, 4, dtype=F64) * 2 - 1
    s = feedback_dense(q, k, g, f)
    assert s.abs().max() <= f.abs().max() / (1 - 0.95) + 1e-9


def test_gradcheck_through_the_solve():
    torch.manual_seed(3)
    B, T, Dk, D = 2, 6, 4, 3
    args = (torch.randn(B, T, Dk, dtype=F64, requires_grad=True),
            torch.randn(B, T, Dk, dtype=F64, requires_grad=True),
            torch.empty(B, T, dtype=F64).uniform_(-0.9, 0.9).requires_grad_(),
            torch.randn(B, T, D, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda q, k, g, f: feedback_dense(q, k, g, f), args)


def test_mixer_gradcheck():
    torch.manual_seed(4)
    m = SessaMixer(8, 2).double()
    a = torch.randn(1, 5, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (a,))


@pytest.mark.parametrize("n_heads,n_kv", [(4, None), (4, 2), (1, None)])
def test_prefill_and_decode_equal_parallel_forward(n_heads, n_kv):
    torch.manual_seed(5)
    block = SessaBlock(16, n_heads, n_kv).double()
    x = torch.randn(2, 13, 16, dtype=F64)
    full = block(x)
    cache = block.init_cache()
    parts = [block(x[:, :5], cache)]                     # prefill 5 tokens
    parts += [block(x[:, t:t + 1], cache) for t in range(5, 9)]   # 4 decode steps
    parts.append(block(x[:, 9:], cache))                 # a multi-token continuation
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10, rtol=0)
    assert cache.extra["s"].view.shape == (2, 13, 16)
    assert cache.extra["k_b"].view.shape == (2, 13, 16)


def test_bf16_activations_solve_in_fp32():
    torch.manual_seed(6)
    q, k = torch.randn(2, 200, 32), torch.randn(2, 200, 32)
    g = torch.empty(2, 200).uniform_(0.5, 0.99)
    f = torch.randn(2, 200, 16)
    ref = feedback_dense(q.double(), k.double(), g.double(), f.double())
    out = feedback_dense(q.bfloat16(), k.bfloat16(), g.bfloat16(), f.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_rope_angles_are_accurate_in_bf16():
    x = torch.randn(1, 4096, 2, 64)
    pos = torch.arange(4096)
    ref = apply_rope(x.double(), pos)
    out = apply_rope(x.bfloat16(), pos).double()
    assert ((out - ref).norm() / ref.norm()) < 1e-2   # bf16 angles would be radians off


def test_gain_and_init_follow_reference_and_paper_variants():
    torch.manual_seed(7)
    ref = SessaMixer(32, 4)
    assert ref.gamma_bias.item() == 1.0
    a = F.gelu(torch.randn(4, 50, 32))
    g = ref.gamma(a)
    assert bool((g.abs() < 0.999).all()) and 0.4 < g.mean().item() < 0.95
    want = 0.999 * torch.tanh(ref.gamma_bias + a @ ref.gamma_ctx.weight[0])
    assert torch.allclose(g, want, atol=1e-6)
    paper = SessaMixer(32, 4, variant="paper", fb_dim=16)
    assert paper.gamma_bias.item() == 0.0 and paper.proj_fb.out_features == 32
    assert torch.allclose(paper.gamma(a), torch.tanh(a @ paper.gamma_ctx.weight[0]), atol=1e-6)
    assert paper(a).shape == a.shape
    with pytest.raises(ValueError, match="variant='paper'"):
        SessaMixer(32, 4, fb_dim=16)
    with pytest.raises(ValueError, match="impl"):
        SessaMixer(32, 4, impl="fast")


# ---- reference-release import ---------------------------------------------------------------

def _reference_layer_forward(sd: dict, x, n_heads: int, n_kv: int, base: float = 10000.0):
    """An independent dense implementation of the authors' layer, written from docs/model.md."""
    B, T, D = x.shape
    d = D // n_heads
    lin = lambda z, n: z @ sd[n + ".weight"].T + sd.get(n + ".bias", 0)
    xn = F.layer_norm(x, (D,), sd["ln.weight"], sd["ln.bias"], 1e-5)
    a, gate = lin(xn, "W_in").split(D, -1)
    a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    q = lin(a, "mixer.q_proj").view(B, T, n_heads, d)
    k = lin(a, "mixer.k_proj").view(B, T, n_kv, d)
    v = lin(a, "mixer.v_proj").view(B, T, n_kv, d)
    theta = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.arange(T, dtype=F64)[:, None] * theta                    # (T, d/2)
    c, s_ = ang.cos()[:, None], ang.sin()[:, None]

    def rot(z):
        z2 = z.view(B, T, z.shape[2], d // 2, 2)
        e, o = z2[..., 0], z2[..., 1]
        return torch.stack([e * c - o * s_, e * s_ + o * c], -1).view_as(z)

    q, k = rot(q), rot(k)
    rep = n_heads // n_kv
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    o = torch.zeros(B, T, n_heads, d, dtype=F64)
    for t in range(T):
        w = torch.softmax(torch.einsum("bhd,bjhd->bhj", q[:, t], k[:, :t + 1]) / math.sqrt(d), -1)
        o[:, t] = torch.einsum("bhj,bjhd->bhd", w, v[:, :t + 1])
    f = o.reshape(B, T, D)
    if "mixer.out_proj.weight" in sd:
        f = f @ sd["mixer.out_proj.weight"].T
    qb, kb = lin(a, "mixer.proj_fb").split(D, -1)
    gam = 0.999 * torch.tanh(sd["mixer.gamma_bias"] + a @ sd["mixer.gamma_ctx.weight"][0])
    bfb = torch.zeros(B, T, T, dtype=F64)
    for t in range(1, T):
        bfb[:, t, :t] = gam[:, t, None] * torch.softmax(
            torch.einsum("bd,bjd->bj", qb[:, t], kb[:, :t]) / math.sqrt(D), -1)
    s = torch.linalg.solve(torch.eye(T, dtype=F64) - bfb, f)
    return x + lin(s * gate, "W_out")


def _random_reference_state(D: int, n_heads: int, n_kv: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64) * 0.3
    d = D // n_heads
    sd = {"ln.weight": 1 + r(D), "ln.bias": r(D), "W_in.weight": r(2 * D, D),
          "W_in.bias": r(2 * D), "mixer.q_proj.weight": r(D, D), "mixer.q_proj.bias": r(D),
          "mixer.k_proj.weight": r(n_kv * d, D), "mixer.k_proj.bias": r(n_kv * d),
          "mixer.v_proj.weight": r(n_kv * d, D), "mixer.v_proj.bias": r(n_kv * d),
          "mixer.proj_fb.weight": r(2 * D, D), "mixer.proj_fb.bias": r(2 * D),
          "mixer.gamma_bias": torch.tensor(1.0, dtype=F64), "mixer.gamma_ctx.weight": r(1, D),
          "W_out.weight": r(D, D), "W_out.bias": r(D),
          "mixer.rope_inv_freq": 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d),
          "mixer.causal_mask": torch.ones(8, 8, dtype=torch.bool).tril(),
          "mixer.strict_mask": torch.ones(8, 8, dtype=torch.bool).tril(-1)}
    if n_heads > 1:
        sd["mixer.out_proj.weight"] = r(D, D)
    return sd


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (1, 1)])
def test_reference_import_matches_independent_implementation(n_heads, n_kv):
    D, T = 16, 11
    sd = _random_reference_state(D, n_heads, n_kv, seed=n_heads + n_kv)
    block = SessaBlock.from_reference(sd, n_heads=n_heads)
    x = torch.randn(2, T, D, dtype=F64, generator=torch.Generator().manual_seed(9))
    want = _reference_layer_forward(sd, x, n_heads, n_kv)
    assert torch.allclose(block(x), want, atol=1e-10, rtol=0)


def test_reference_import_is_strict():
    sd = _random_reference_state(16, 4, 4, seed=0)
    missing = {k: v for k, v in sd.items() if k != "mixer.proj_fb.bias"}
    with pytest.raises(RuntimeError, match="proj_fb.bias"):
        SessaBlock.from_reference(missing, n_heads=4)
    with pytest.raises(RuntimeError, match="surprise"):
        SessaBlock.from_reference({**sd, "mixer.surprise": torch.zeros(2)}, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        SessaBlock.from_reference(sd, n_heads=4, n_kv_heads=2)
