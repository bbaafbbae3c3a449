"""Multi-head causal self-attention (RoPE, GQA, SDPA) with a KV cache.

Used on its own as the Transformer baseline's sequence mixer, and as the forward branch of the
Sessa mixer (which subclasses it, so the parameter names match the reference release:
``q_proj k_proj v_proj out_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sessa_pt.models.rope import apply_rope_from


class SeqBuffer:
    """A tensor that grows along one dimension (the sequence) in amortised O(1): storage is
    preallocated and doubled when full, so a decode step never copies the whole cache."""

    def __init__(self, dim: int) -> None:
        self.dim, self.length, self._buf = dim, 0, None

    @property
    def view(self) -> Tensor | None:
        return None if self._buf is None else self._buf.narrow(self.dim, 0, self.length)

    def append(self, x: Tensor) -> Tensor:
        n = x.shape[self.dim]
        if self._buf is None or self.length + n > self._buf.shape[self.dim]:
            cap = max(16, 2 * (self.length + n))
            shape = list(x.shape)
            shape[self.dim] = cap
            buf = x.new_empty(shape)
            if self._buf is not None:
                buf.narrow(self.dim, 0, self.length).copy_(self.view)
            self._buf = buf
        self._buf.narrow(self.dim, self.length, n).copy_(x)
        self.length += n
        return self.view


@dataclass
class KVCache:
    """Keys and values of every past token, (B, H_kv, P, d) each; ``length`` = P. ``extra`` holds
    other per-token state of a mixer (Sessa: k_b and s)."""

    keys: SeqBuffer = field(default_factory=lambda: SeqBuffer(2))
    values: SeqBuffer = field(default_factory=lambda: SeqBuffer(2))
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.keys.length

    @property
    def k(self) -> Tensor | None:
        return self.keys.view

    @property
    def v(self) -> Tensor | None:
        return self.values.view

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.keys.append(k), self.values.append(v)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, n_past: int,
                     pad_head_dim: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over keys j <= n_past + t. q (B,H,T,d); k, v (B,Hkv,P+T,d).

    ``pad_head_dim``: zero-pad d to a multiple of this (the scale stays 1/sqrt(d); zero columns
    change no score and only add zero output columns, sliced off). Default: 8 on CUDA, where the
    fused attention kernels (cuDNN, flash) want d % 8 == 0 (d = 54 at recipes/m125's
    transformer_mlp); under torch.compile the pad fuses into the RoPE kernel. None elsewhere.
    """
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    d = q.shape[-1]
    multiple = pad_head_dim if pad_head_dim is not None else (8 if q.is_cuda else 1)
    if d % multiple:
        extra = -d % multiple
        q, k, v = (F.pad(t, (0, extra)) for t in (q, k, v))
        return _sdpa_causal(q, k, v, n_past, scale=d ** -0.5)[..., :d]
    return _sdpa_causal(q, k, v, n_past)


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor, n_past: int, scale: float | None = None
                 ) -> Tensor:
    T, S = q.shape[2], k.shape[2]
    if n_past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
    if T == 1:   # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    row = torch.arange(T, device=q.device).unsqueeze(1) + n_past
    mask = torch.arange(S, device=q.device).unsqueeze(0) <= row
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class AttentionMixer(nn.Module):
    """Causal multi-head attention: (B, T, D) -> (B, T, D).

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention. ``out_proj`` has no bias and is the
    identity when there is a single head (as in the reference release).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        qkv_bias: bool = True,
        use_rope: bool = True,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be divisible by n_kv_heads={n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; d_model/n_heads = {self.head_dim}")
        self.use_rope, self.rope_base = use_rope, rope_base
        kv_dim = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=False) if n_heads > 1 else nn.Identity()

    def init_cache(self) -> KVCache:
        return KVCache()

    def attend(self, a: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """The attention output before ``out_proj`` (B, T, D), and k (B, T, H_kv, d)."""
        B, T, _ = a.shape
        n_past = 0 if cache is None else cache.length
        # Head counts come from the projections' widths, so a tensor-parallel plan that gives each
        # rank a slice of the heads needs no change here.
        q = self.q_proj(a).view(B, T, -1, self.head_dim)
        k = self.k_proj(a).view(B, T, -1, self.head_dim)
        v = self.v_proj(a).view(B, T, -1, self.head_dim)
        if self.use_rope:
            q = apply_rope_from(q, n_past, self.rope_base)
            k = apply_rope_from(k, n_past, self.rope_base)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        o = causal_attention(q, k, v, n_past)
        return o.transpose(1, 2).reshape(B, T, -1), k

    def forward(self, a: Tensor, cache: KVCache | None = None) -> Tensor:
        o, _ = self.attend(a, cache)
        return self.out_proj(o)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: projections plus the full (unmasked) T x T score and value
        products, the convention of torch.utils.flop_counter and of PaLM-style MFU."""
        D, kv = self.d_model, self.n_kv_heads * self.head_dim
        proj = 2 * D * (D + 2 * kv) + (2 * D * D if self.n_heads > 1 else 0)
        return float(proj + 4 * seq_len * D)
