"""The Sessa feedback branch in its readable dense form (SPEC_SESSA.md section 2).

Given feedback queries/keys ``q_b, k_b`` (B, T, Dk), a per-token gain ``gamma`` (B, T) and the
forward-branch output ``f`` (B, T, D), this module solves

    (I - B_fb) s = f,     B_fb[t, j] = gamma_t * softmax_{j < t}(q_b[t] . k_b[j] / sqrt(Dk))

i.e. ``s_0 = f_0`` and ``s_t = f_t + gamma_t * sum_{j<t} alpha[t, j] s_j``.

This is the reference that every faster implementation (the chunked algorithm and the Triton
kernels in ``sessa_kernels``) must match. It materialises the T x T routing matrix, so it costs
O(B T^2) memory: use it for tests, short sequences and as the ground truth.

The solve always runs in float32 (float64 if the inputs are float64) whatever the activation
dtype (SPEC pitfall 4); the result is cast back to ``f.dtype``.
"""

from __future__ import annotations

import torch
from sessa_kernels.precision import accumulation_dtype
from torch import Tensor

FEEDBACK_IMPLS = ("dense", "chunked", "triton")


def strict_past_routing(q_b: Tensor, k_b: Tensor, scale: float, n_past: int = 0) -> Tensor:
    """Row-stochastic routing over the strict past, (B, T, n_past + T).

    Query t (absolute position ``n_past + t``) attends to keys at absolute positions
    ``j < n_past + t``; ``k_b`` holds all ``n_past + T`` keys. A row with no past (absolute
    position 0) is all zeros instead of the NaN a naive masked softmax gives (SPEC pitfall 1).
    """
    T, S = q_b.shape[1], k_b.shape[1]
    logits = torch.einsum("btd,bsd->bts", q_b, k_b) * scale
    row = torch.arange(T, device=q_b.device).unsqueeze(1) + n_past
    col = torch.arange(S, device=q_b.device).unsqueeze(0)
    visible = col < row                                   # strict past: j < t
    has_past = visible.any(dim=-1, keepdim=True)          # False only at absolute position 0
    logits = logits.masked_fill(~visible, float("-inf"))
    logits = torch.where(has_past, logits, torch.zeros_like(logits))  # keep row 0 finite
    alpha = torch.softmax(logits, dim=-1)
    return torch.where(has_past, alpha, torch.zeros_like(alpha))


def feedback_dense(
    q_b: Tensor,
    k_b: Tensor,
    gamma: Tensor,
    f: Tensor,
    *,
    scale: float | None = None,
    past_k_b: Tensor | None = None,
    past_s: Tensor | None = None,
) -> Tensor:
    """Dense feedback solve; returns ``s`` with the shape and dtype of ``f``.

    ``past_k_b`` (B, P, Dk) and ``past_s`` (B, P, D) continue a sequence whose first P outputs are
    already known (prefill / decoding): the new rows read the past outputs as fixed values and
    their softmax normaliser runs over the whole strict past, old and new.
    """
    if q_b.shape != k_b.shape:
        raise ValueError(f"q_b {tuple(q_b.shape)} and k_b {tuple(k_b.shape)} must have one shape")
    B, T, Dk = q_b.shape
    if f.shape[:2] != (B, T) or gamma.shape != (B, T):
        raise ValueError(
            f"expected f (B={B}, T={T}, D) and gamma (B, T); got f {tuple(f.shape)}, "
            f"gamma {tuple(gamma.shape)}"
        )
    if (past_k_b is None) != (past_s is None):
        raise ValueError("past_k_b and past_s must be given together")
    scale = Dk**-0.5 if scale is None else scale
    dt = accumulation_dtype(q_b, k_b, gamma, f)
    n_past = 0 if past_k_b is None else past_k_b.shape[1]
    keys = k_b if past_k_b is None else torch.cat([past_k_b.to(k_b.dtype), k_b], dim=1)
    alpha = strict_past_routing(q_b.to(dt), keys.to(dt), scale, n_past)
    weights = gamma.to(dt).unsqueeze(-1) * alpha            # (B, T, P + T)
    rhs = f.to(dt)
    if n_past:
        rhs = rhs + weights[:, :, :n_past] @ past_s.to(dt)
    b_fb = weights[:, :, n_past:]                             # strictly lower triangular
    # (I - B_fb) s = rhs; the unit diagonal is implied, so pass -B_fb.
    s = torch.linalg.solve_triangular(-b_fb, rhs, upper=False, unitriangular=True)
    return s.to(f.dtype)


def sessa_feedback(
    q_b: Tensor,
    k_b: Tensor,
    gamma: Tensor,
    f: Tensor,
    *,
    impl: str = "dense",
    scale: float | None = None,
    chunk_size: int = 64,
    solve: str = "panel",
    panel_mib: float = 256.0,
) -> Tensor:
    """The whole feedback branch through the chosen implementation.

    ``dense``: this module (materialises T x T; ``chunk_size`` unused). ``chunked``: blocked
    forward substitution in plain PyTorch, O(T) memory, ``chunk_size`` rows at a time
    (``sessa_kernels.chunked``). ``triton``: the fused GPU kernels, chunks of ``chunk_size``
    rows (16, 32, 64 or 128), ``solve`` (panel | panel_inverse | queue) and ``panel_mib`` as in
    ``sessa_kernels.triton_feedback.feedback_triton``. ``chunked`` and ``triton`` run as
    PyTorch custom operators, opaque to torch.compile.
    """
    if impl == "dense":
        return feedback_dense(q_b, k_b, gamma, f, scale=scale)
    if impl == "chunked":
        from sessa_kernels.chunked import feedback_chunked

        return feedback_chunked(q_b, k_b, gamma, f, scale=scale, chunk_size=chunk_size)
    if impl == "triton":
        from sessa_kernels.triton_feedback import feedback_triton

        return feedback_triton(q_b, k_b, gamma, f, scale=scale, block_m=chunk_size,
                               solve=solve, panel_mib=panel_mib)
    raise ValueError(f"unknown feedback impl {impl!r}; choose one of {FEEDBACK_IMPLS}")
