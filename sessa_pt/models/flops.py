"""Measured FLOPs through ``torch.utils.flop_counter``, to check every ``flops_per_token``.

FlopCounterMode counts matmuls but, in torch 2.13, neither the CPU flash-attention kernel behind
``scaled_dot_product_attention`` nor ``linalg.solve_triangular``; this module registers formulas
for both so a measured count covers the whole forward pass.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv): QK^T and PV, unmasked.
    *batch, t, d = q
    s, dv = k[-2], v[-1]
    return 2 * math.prod(batch) * t * s * (d + dv)


def _trsm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    # (..., T, T) triangular against (..., T, N): T^2 N / 2 multiply-adds -> T^2 N FLOPs.
    t, n = b[-2], b[-1]
    return math.prod(b[:-2]) * t * t * n


CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten.linalg_solve_triangular: _trsm_flops,
}


def measured_forward_flops(module: torch.nn.Module, *inputs, **kwargs) -> int:
    """Total forward FLOPs of ``module(*inputs, **kwargs)`` as torch's flop counter sees them."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter, torch.no_grad():
        module(*inputs, **kwargs)
    return counter.get_total_flops()
