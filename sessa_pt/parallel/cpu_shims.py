"""Make megatron-core's CUDA-only calls work on a CPU-only machine (gloo).

megatron-core 0.16.1 reaches for CUDA in a few places even when the model is on CPU: its RNG
tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``) saves and
restores ``torch.cuda`` RNG state, and some buffers are allocated on
``torch.cuda.current_device()``. On a machine without CUDA those raise
"Torch not compiled with CUDA enabled". This shim maps them onto the CPU RNG and device.
It is applied ONLY when CUDA is absent (``install_if_needed``), never on a GPU machine; the
CPU equivalence tests (tests/distributed) run through it.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def install_if_needed() -> bool:
    """Install the shim when CUDA is unavailable; returns whether it is (now) installed."""
    global _INSTALLED
    if torch.cuda.is_available() or _INSTALLED:
        return _INSTALLED
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: \
        torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: \
        torch.set_rng_state(state)
    _INSTALLED = True
    return True
