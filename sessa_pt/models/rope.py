"""Rotary position embedding, interleaved-pair layout (pairs (2i, 2i+1)), base 10000.

Angles, cos and sin are computed in float32 whatever the activation dtype: in bf16 the angle
of position 2048 is off by several radians (SPEC pitfall 3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inv_freq(head_dim: int, base: float = 10000.0, device=None, dtype=torch.float32) -> Tensor:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    idx = torch.arange(0, head_dim, 2, dtype=dtype, device=device)
    return 1.0 / (base ** (idx / head_dim))


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate x (..., T, H, d) at integer ``positions`` (T,); returns x's dtype."""
    d = x.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(d, base, device=x.device, dtype=compute)
    angles = positions.to(compute).unsqueeze(-1) * inv_freq      # (T, d/2), >= float32
    cos = angles.cos().unsqueeze(-2)                              # (T, 1, d/2)
    sin = angles.sin().unsqueeze(-2)
    xf = x.to(compute)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
