"""Rotary position embedding, interleaved-pair layout (pairs (2i, 2i+1)), base 10000.

Angles, cos and sin are computed in float32 whatever the activation dtype: in bf16 the angle
of position 2048 is off by several radians (docs/model.md §7, pitfall 3).

cos and sin come from a table of (positions, d/2) float32 values cached per (head_dim, base,
device), grown to the next power of two when a longer sequence arrives. Without it, a compiled
block inlines pow/cos/sin into the rotation kernel and evaluates them once per element of q and
k (B x T x H x d) instead of once per (T, d/2). The cache is a module-level dict; a compiled
block reads the table as a constant input, so the rotation is a memory-bound kernel. The table
holds exactly the values the per-call computation gives.

Build the tables before a compiled block is first traced (:func:`build_tables`; the training
stages do): a trace that builds the table inside its graph differs from every later trace,
which reads it, and activation checkpointing's recompute of the first step would then save
other tensors than its forward did (torch.utils.checkpoint.CheckpointError).
"""

from __future__ import annotations

import torch
from sessa_kernels.precision import accumulation_dtype
from torch import Tensor, nn

# (head_dim, base, device, dtype) -> (cos, sin), each (capacity, head_dim / 2)
_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def rope_inv_freq(head_dim: int, base: float = 10000.0, device=None, dtype=torch.float32) -> Tensor:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    idx = torch.arange(0, head_dim, 2, dtype=dtype, device=device)
    return 1.0 / (base ** (idx / head_dim))


def rope_table(length: int, head_dim: int, base: float = 10000.0, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles ``p * inv_freq`` for positions ``p < capacity``, each
    (capacity, head_dim / 2) in ``dtype`` (float32 or float64), capacity >= ``length``."""
    key = (head_dim, float(base), torch.device(device if device is not None else "cpu"), dtype)
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        cap = 1 << max(6, (max(length, 1) - 1).bit_length())
        inv_freq = rope_inv_freq(head_dim, base, device=key[2], dtype=dtype)
        angles = torch.arange(cap, device=key[2]).to(dtype).unsqueeze(-1) * inv_freq
        table = (angles.cos(), angles.sin())
        _TABLES[key] = table
    return table


def rotary_specs(module: nn.Module) -> list[tuple[int, float]]:
    """(head_dim, base) of every rotary attention under ``module``."""
    return sorted({(m.head_dim, float(m.rope_base)) for m in module.modules()
                   if getattr(m, "use_rope", False)})


def build_tables(specs: list[tuple[int, float]], x: Tensor) -> None:
    """Make the tables of ``specs`` (from :func:`rotary_specs`) that the attention layers fed
    with the hidden states ``x`` (B, T, D) will read, in eager mode."""
    for head_dim, base in specs:
        rope_table(x.shape[1], head_dim, base, x.device, accumulation_dtype(x))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, H, d) by cos/sin (T, d/2), in cos's dtype; returns x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                # (T, 1, d/2)
    xf = x.to(cos.dtype)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate x (..., T, H, d) at integer ``positions`` (T,); returns x's dtype."""
    n = int(positions.max()) + 1 if positions.numel() else 0
    cos, sin = rope_table(n, x.shape[-1], base, x.device, accumulation_dtype(x))
    return _rotate(x, cos[positions], sin[positions])


def apply_rope_from(x: Tensor, start: int, base: float = 10000.0) -> Tensor:
    """Rotate x (..., T, H, d) at positions ``start, ..., start + T - 1`` (a slice of the
    table: no position tensor, no gather); same values as :func:`apply_rope`."""
    T = x.shape[-3]
    cos, sin = rope_table(start + T, x.shape[-1], base, x.device, accumulation_dtype(x))
    return _rotate(x, cos.narrow(0, start, T), sin.narrow(0, start, T))
