"""The accumulation dtype: reductions, solves and scans run in float32 whatever the activation
dtype (bf16, fp16), and in float64 when an input is float64 (the tests' reference precision).
The one definition every kernel and model module uses."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(*inputs: Tensor | torch.dtype) -> torch.dtype:
    """float64 if any of ``inputs`` (tensors or dtypes) is float64, else float32."""
    if not inputs:
        raise ValueError("accumulation_dtype needs at least one tensor or dtype")
    for x in inputs:
        if (x if isinstance(x, torch.dtype) else x.dtype) == torch.float64:
            return torch.float64
    return torch.float32
