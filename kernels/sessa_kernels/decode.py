"""One decoding step of the Sessa feedback branch over the cache, fused.

    s_t = f_t + gamma_t * softmax(scale * K_b q_b_t) @ S        (s_t = f_t when the cache is empty)

with ``K_b`` (B, P, Dk) the past feedback keys and ``S`` (B, P, D) the past mixer outputs.
The read is memory-bound (it must stream K_b and S once: 2 P D elements, as much as an
attention KV read), so the Triton path is a split-K "flash-decoding" kernel: the cache is cut
into splits, each program streams its split's keys once (scores to a small float32 scratch,
online max and sum) and then its values once, one channel block at a time; a second small
kernel merges the splits' (max, sum, partial output) and adds f_t. A plain PyTorch fallback
(float32) runs everywhere else.

The Triton path is a PyTorch custom operator, ``sessa::feedback_decode_triton``
(``sessa_kernels.oplib``), so a torch.compile'd decode step calls it as one opaque op. It is
CUDA-graph capturable: no host synchronisation, no ``.item()``, the device query is cached
(``_sm_count``), and the scratch buffers (allocated per call, from the graph's pool while
capturing) have shapes fixed by (B, P, Dk, D). A captured step replays with the
context length P of its capture; it reads q_b_t, gamma_t, f_t and the caches from the
addresses it was captured with (``kernels/benchmarks/bench_sessa_layer.py``, ``bench_decode``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from sessa_kernels.oplib import define_op
from sessa_kernels.precision import accumulation_dtype


def feedback_decode_torch(q_b_t: Tensor, gamma_t: Tensor, f_t: Tensor, K_b: Tensor, S: Tensor,
                          scale: float) -> Tensor:
    """Reference / CPU path in float32 (float64 for float64 inputs)."""
    dt = accumulation_dtype(f_t)
    logits = torch.einsum("bk,bpk->bp", q_b_t.to(dt), K_b.to(dt)) * scale
    alpha = torch.softmax(logits, dim=-1)
    read = torch.einsum("bp,bpd->bd", alpha, S.to(dt))
    return (f_t.to(dt) + gamma_t.to(dt).unsqueeze(-1) * read).to(f_t.dtype)


@functools.cache
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``, asked once per device: the decode
    step makes no device query per call (it must be capturable in a CUDA graph)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_triton(q_b_t: Tensor, gamma_t: Tensor, f_t: Tensor, K_b: Tensor, S: Tensor,
                   scale: float) -> Tensor:
    """The split-K Triton read as a PyTorch custom operator (opaque to torch.compile; no
    autograd: decoding runs without gradients). Returns a new (B, D) tensor in f_t's dtype.
    The caches may be views of preallocated (B, capacity, D) buffers: rows must be dense, the
    batch stride is passed to the kernel, so no copy of the cache is made."""
    from sessa_kernels import _decode_kernels as kern

    DK = K_b.shape[2]
    K = K_b if K_b.stride(2) == 1 and K_b.stride(1) == DK else K_b.contiguous()
    S = S if S.stride(2) == 1 and S.stride(1) == S.shape[2] else S.contiguous()
    q, g, f = q_b_t.contiguous(), gamma_t.contiguous(), f_t.contiguous()

    B, P, DK = K.shape
    D = S.shape[-1]
    BN = 64
    n_sm = _sm_count(f.device.index) if f.is_cuda else 4
    n_blocks = math.ceil(P / BN)
    n_split = max(1, min(n_blocks, math.ceil(2 * n_sm / B)))
    per_split = math.ceil(n_blocks / n_split) * BN
    n_split = math.ceil(P / per_split)
    dev = f.device
    scores = torch.empty(B, n_split * per_split, dtype=torch.float32, device=dev)
    m = torch.empty(B, n_split, dtype=torch.float32, device=dev)
    lsum = torch.empty(B, n_split, dtype=torch.float32, device=dev)
    part = torch.empty(B, n_split, D, dtype=torch.float32, device=dev)
    bk = min(128, max(16, 1 << (DK - 1).bit_length()))
    bd = min(256, max(16, 1 << (D - 1).bit_length()))
    kern.decode_split[(B, n_split)](
        q, K, S, scores, m, lsum, part, P, K.stride(0), S.stride(0), n_split, per_split,
        scale * 1.4426950408889634,
        DK=DK, D=D, BN=BN, BK=bk, BD=bd, num_warps=4)
    out = torch.empty_like(f)
    kern.decode_merge[(B, math.ceil(D / bd))](
        m, lsum, part, g, f, out, n_split, D=D, BD=bd,
        NS=max(2, 1 << (n_split - 1).bit_length()), num_warps=4)
    return out


def _decode_triton_fake(q_b_t, gamma_t, f_t, K_b, S, scale):
    return torch.empty_like(f_t, memory_format=torch.contiguous_format)


feedback_decode_triton = define_op(__name__, __file__, "feedback_decode_triton", _decode_triton,
                                   fake=_decode_triton_fake)


def feedback_decode_step(q_b_t: Tensor, gamma_t: Tensor, f_t: Tensor, K_b: Tensor, S: Tensor,
                         scale: float | None = None, *, impl: str = "auto") -> Tensor:
    """The feedback read of one new token; returns s_t (B, D) with f_t's dtype.

    impl: "auto" (Triton on CUDA, PyTorch otherwise), "triton" or "torch".
    """
    if q_b_t.dim() != 2 or K_b.dim() != 3 or S.dim() != 3 or f_t.dim() != 2:
        raise ValueError("expected q_b_t (B, Dk), gamma_t (B,), f_t (B, D), K_b (B, P, Dk), "
                         f"S (B, P, D); got {tuple(q_b_t.shape)}, {tuple(gamma_t.shape)}, "
                         f"{tuple(f_t.shape)}, {tuple(K_b.shape)}, {tuple(S.shape)}")
    B, DK = q_b_t.shape
    if (K_b.shape[0], K_b.shape[2]) != (B, DK) or S.shape[:2] != K_b.shape[:2] \
            or f_t.shape != (B, S.shape[2]) or gamma_t.shape != (B,):
        raise ValueError(f"inconsistent shapes: q_b_t {tuple(q_b_t.shape)}, gamma_t "
                         f"{tuple(gamma_t.shape)}, f_t {tuple(f_t.shape)}, K_b "
                         f"{tuple(K_b.shape)}, S {tuple(S.shape)}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be auto, triton or torch, got {impl!r}")
    scale = DK**-0.5 if scale is None else float(scale)
    if K_b.shape[1] == 0:
        return f_t.clone()
    use_triton = impl == "triton" or (impl == "auto" and f_t.is_cuda
                                      and f_t.dtype != torch.float64)
    if not use_triton:
        return feedback_decode_torch(q_b_t, gamma_t, f_t, K_b, S, scale)
    return feedback_decode_triton(q_b_t, gamma_t, f_t, K_b, S, scale)
