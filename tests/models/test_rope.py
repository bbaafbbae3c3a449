"""The cached RoPE table: the same values as the per-call angles, shared and grown, and one
compiled graph for every attention block (no per-block recompiles, no graph breaks)."""

from __future__ import annotations

import torch

from sessa_pt.models.rope import apply_rope, apply_rope_from, rope_inv_freq, rope_table


def _rope_per_call(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """The formula without a table: angles, cos and sin computed for these positions."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(compute).unsqueeze(-1) * rope_inv_freq(x.shape[-1], base, x.device,
                                                                 compute)
    cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)
    xf = x.to(compute)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2).to(
        x.dtype)


def test_table_values_equal_per_call_rope() -> None:
    x = torch.randn(2, 37, 3, 16, dtype=torch.bfloat16)
    for start in (0, 5, 3000):
        pos = torch.arange(start, start + 37)
        ref = _rope_per_call(x, pos, 500.0)
        assert torch.equal(apply_rope_from(x, start, 500.0), ref)
        assert torch.equal(apply_rope(x, pos, 500.0), ref)
    x64 = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    assert torch.equal(apply_rope_from(x64, 2), _rope_per_call(x64, torch.arange(2, 11), 1e4))


def test_table_is_cached_and_grows_to_a_power_of_two() -> None:
    a = rope_table(100, 24, 777.0)
    assert a[0].shape == (128, 12) and a[0].dtype == torch.float32
    assert rope_table(128, 24, 777.0)[0] is a[0]               # reused, not recomputed
    b = rope_table(129, 24, 777.0)
    assert b[0].shape == (256, 12) and torch.equal(b[0][:128], a[0])


def test_compiled_attention_blocks_share_one_graph() -> None:
    from torch._dynamo.utils import counters

    from sessa_pt.models.attention import AttentionMixer

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    mixers = [AttentionMixer(32, 4, rope_base=321.0) for _ in range(4)]
    compiled = [torch.compile(m, backend="eager") for m in mixers]
    x = torch.randn(2, 10, 32)
    for _ in range(2):
        for m, c in zip(mixers, compiled, strict=True):
            assert torch.allclose(c(x), m(x), atol=1e-6)
    # the first trace builds the table in its graph, every later one reads the cached table
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]


def test_attention_with_padded_head_dim_is_exact() -> None:
    """Zero-padding d = 54 to 56 (as on CUDA) changes no attention output: prefill, one cached
    token and a chunk after a cache."""
    from sessa_pt.models.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 54, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 54, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 54, generator=g, dtype=torch.float64)
    for n_past, T in ((0, 5), (8, 1), (4, 5)):
        ref = causal_attention(q[:, :, :T], k[:, :, :n_past + T], v[:, :, :n_past + T], n_past,
                               pad_head_dim=1)
        out = causal_attention(q[:, :, :T], k[:, :, :n_past + T], v[:, :, :n_past + T], n_past,
                               pad_head_dim=8)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
