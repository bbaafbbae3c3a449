"""Fused kernels of the Sessa feedback solve, each beside its plain PyTorch reference.

``chunked.feedback_chunked``: blocked forward substitution in PyTorch (CPU path, reference).
``triton_feedback.feedback_triton``: Triton forward and backward (GPU). ``decode``: the fused
one-token feedback read. Triton is imported only when a Triton path runs, so this package
imports on machines without it.
"""

from sessa_kernels.chunked import feedback_chunked
from sessa_kernels.decode import feedback_decode_step
from sessa_kernels.triton_feedback import feedback_triton

__all__ = ["feedback_chunked", "feedback_decode_step", "feedback_triton"]
