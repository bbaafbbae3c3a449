"""The Sessa feedback solve by blocked forward substitution, in plain PyTorch.

Solves ``(I - B_fb) s = f`` with ``B_fb[t, j] = gamma_t * softmax_{j<t}(scale q_b[t] . k_b[j])``
(``sessa_pt.models.feedback.feedback_dense`` is the dense ground truth) one chunk of C rows at a
time, never forming the T x T matrix:

* forward, chunk ``c`` (rows ``[a, e)``): the routing of its rows over the finished past
  ``[0, a)`` and over the chunk itself are two score blocks whose (max, sum) statistics are
  merged online into one log-sum-exp per row (the softmax normaliser spans the whole strict
  past); the past contributes ``rhs = f_c + gamma * alpha_past @ s_past``; the chunk is then a
  small unit-lower-triangular solve ``(I - N_cc) s_c = rhs``.
* backward, by the adjoint identities: ``u = (I - B_fb)^{-T} ds`` in reverse time (chunk by
  chunk, ``u_c = (I - N_cc)^{-T}(ds_c + sum_{t >= e} B_fb[t, c]^T u_t)``), ``df = u``,
  ``dgamma_t = <u_t, r_t>`` with ``r_t = sum_j alpha[t, j] s_j`` kept from the forward, and the
  softmax backward ``dlogit[t, j] = alpha[t, j] gamma_t (<u_t, s_j> - dgamma_t)``, which gives
  ``dq_b = scale dlogit @ k_b`` and ``dk_b = scale dlogit^T @ q_b`` chunk row by chunk row.

Memory: the backward needs only O(T D) tensors (q_b, k_b, gamma, s, the per-row log-sum-exp
and r); temporaries are O(C T) per chunk (one chunk's scores against the past). The forward
and backward are PyTorch custom operators (``sessa::feedback_chunked_fwd`` / ``_bwd``, autograd
registered, fake implementations for shapes), like the Triton kernels' operators, so
torch.compile keeps the chunk loop as one opaque call (and the CPU tests exercise the same
operator machinery as the GPU path). Everything runs in float32 (float64 for float64 inputs).
This is the readable reference of the Triton kernels in ``triton_feedback.py`` (same blocking,
same statistics) and the CPU path; on a GPU it is correct but launch-bound (a Python loop over
T / C chunks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sessa_kernels.oplib import define_op
from sessa_kernels.precision import accumulation_dtype


def check_feedback_inputs(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor) -> None:
    """Shapes of the feedback inputs; raises ValueError with what to fix."""
    if q_b.dim() != 3 or q_b.shape != k_b.shape:
        raise ValueError(f"q_b {tuple(q_b.shape)} and k_b {tuple(k_b.shape)} must both be "
                         "(B, T, Dk)")
    B, T, _ = q_b.shape
    if f.dim() != 3 or f.shape[:2] != (B, T) or gamma.shape != (B, T):
        raise ValueError(f"expected f (B={B}, T={T}, D) and gamma (B, T); got f "
                         f"{tuple(f.shape)}, gamma {tuple(gamma.shape)}")


def _chunk_scores(q: Tensor, k: Tensor, scale: float, a: int, e: int) -> tuple[Tensor, Tensor]:
    """Scaled scores of rows [a, e) against the past [0, a) and against the chunk itself, the
    latter with everything on or above the diagonal (j >= t) set to -inf."""
    s_past = scale * q[:, a:e] @ k[:, :a].transpose(1, 2)                  # (B, C, a)
    s_diag = scale * q[:, a:e] @ k[:, a:e].transpose(1, 2)                 # (B, C, C)
    n = e - a
    strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    return s_past, s_diag.masked_fill(~strict, float("-inf"))


def _merge_lse(s_past: Tensor, s_diag: Tensor) -> Tensor:
    """Per-row log-sum-exp over the strict past, merged online from the two score blocks: each
    block gives (max, sum of exp(score - max)); the merge rescales both sums to the larger max.
    Rows with no past (absolute position 0) get +inf, so exp(score - lse) is 0 there."""
    m_d = s_diag.amax(-1)
    m = m_d if s_past.shape[-1] == 0 else torch.maximum(m_d, s_past.amax(-1))
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    l_sum = torch.exp(s_diag - m_safe.unsqueeze(-1)).sum(-1)
    if s_past.shape[-1]:
        l_sum = l_sum + torch.exp(s_past - m_safe.unsqueeze(-1)).sum(-1)
    lse = m_safe + torch.log(l_sum)
    return torch.where(l_sum > 0, lse, torch.full_like(lse, float("inf")))


def _forward(q: Tensor, k: Tensor, g: Tensor, f: Tensor, scale: float, C: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """s, lse (B, T), r (B, T, D), all in the solve dtype of the (already cast) inputs."""
    B, T, _ = q.shape
    s = torch.empty_like(f)
    r = torch.empty_like(f)
    lse = torch.empty(B, T, dtype=f.dtype, device=f.device)
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    for a in range(0, T, C):
        e = min(a + C, T)
        s_past, s_diag = _chunk_scores(q, k, scale, a, e)
        lse_c = _merge_lse(s_past, s_diag)
        lse[:, a:e] = lse_c
        alpha_past = torch.exp(s_past - lse_c.unsqueeze(-1))             # (B, C, a)
        alpha_diag = torch.exp(s_diag - lse_c.unsqueeze(-1))             # (B, C, C), strict
        r_past = alpha_past @ s[:, :a]                                   # (B, C, D)
        gc = g[:, a:e].unsqueeze(-1)
        n_cc = gc * alpha_diag
        s_c = torch.linalg.solve_triangular(eye[: e - a, : e - a] - n_cc, f[:, a:e] + gc * r_past,
                                            upper=False, unitriangular=True)
        s[:, a:e] = s_c
        r[:, a:e] = r_past + alpha_diag @ s_c
    return s, lse, r


def _backward(q: Tensor, k: Tensor, g: Tensor, s: Tensor, lse: Tensor, r: Tensor, ds: Tensor,
              scale: float, C: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dgamma, df from the saved forward state (all in the solve dtype)."""
    T = q.shape[1]
    eye = torch.eye(C, dtype=s.dtype, device=s.device)
    u = torch.empty_like(ds)
    starts = list(range(0, T, C))
    # Adjoint solve in reverse time: u_c = (I - N_cc)^{-T} (ds_c + sum_{t >= e} B[t, c]^T u_t).
    for a in reversed(starts):
        e = min(a + C, T)
        rhs = ds[:, a:e]
        if e < T:
            alpha_later = torch.exp(scale * q[:, e:] @ k[:, a:e].transpose(1, 2)
                                    - lse[:, e:].unsqueeze(-1))          # (B, T - e, C)
            rhs = rhs + alpha_later.transpose(1, 2) @ (g[:, e:].unsqueeze(-1) * u[:, e:])
        _, s_diag = _chunk_scores(q, k, scale, a, e)
        n_cc = g[:, a:e].unsqueeze(-1) * torch.exp(s_diag - lse[:, a:e].unsqueeze(-1))
        u[:, a:e] = torch.linalg.solve_triangular((eye[: e - a, : e - a] - n_cc).transpose(1, 2), rhs,
                                                  upper=True, unitriangular=True)
    dgamma = (u * r).sum(-1)
    # Softmax backward, one row chunk against its whole (strict) past at a time.
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    for a in starts:
        e = min(a + C, T)
        scores = scale * q[:, a:e] @ k[:, :e].transpose(1, 2)           # (B, C, e)
        strict = (torch.arange(e, device=q.device).unsqueeze(0)
                  < torch.arange(a, e, device=q.device).unsqueeze(1))
        alpha = torch.exp(scores.masked_fill(~strict, float("-inf"))
                          - lse[:, a:e].unsqueeze(-1))
        dlogit = alpha * g[:, a:e].unsqueeze(-1) * (u[:, a:e] @ s[:, :e].transpose(1, 2)
                                                    - dgamma[:, a:e].unsqueeze(-1))
        dq[:, a:e] = scale * dlogit @ k[:, :e]
        dk[:, :e] += scale * dlogit.transpose(1, 2) @ q[:, a:e]
    return dq, dk, dgamma, u


def _fwd_op(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, scale: float,
            chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Forward solve on inputs of one float dtype (the solve dtype): (s, lse, r) in that dtype;
    lse (B, T) in natural-log units (+inf at t = 0)."""
    return _forward(q_b, k_b, gamma, f, scale, chunk_size)


def _fwd_fake(q_b, k_b, gamma, f, scale, chunk_size):
    B, T, D = f.shape
    return f.new_empty(B, T, D), f.new_empty(B, T), f.new_empty(B, T, D)


def _bwd_op(q_b: Tensor, k_b: Tensor, gamma: Tensor, s: Tensor, lse: Tensor, r: Tensor,
            ds: Tensor, scale: float, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq_b, dk_b, dgamma, df) from the forward's saved state and ds, in the solve dtype."""
    return _backward(q_b, k_b, gamma, s, lse, r, ds.to(s.dtype), scale, chunk_size)


def _bwd_fake(q_b, k_b, gamma, s, lse, r, ds, scale, chunk_size):
    return (torch.empty_like(q_b, memory_format=torch.contiguous_format),
            torch.empty_like(k_b, memory_format=torch.contiguous_format),
            torch.empty_like(gamma, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    q_b, k_b, gamma, _f, scale, chunk_size = inputs
    s, lse, r = output
    ctx.save_for_backward(q_b, k_b, gamma, s, lse, r)
    ctx.settings = (scale, chunk_size)
    ctx.mark_non_differentiable(lse, r)


def _backward_formula(ctx, ds, _dlse, _dr):
    q_b, k_b, gamma, s, lse, r = ctx.saved_tensors
    if ds is None:
        ds = torch.zeros_like(s)
    return (*feedback_chunked_bwd(q_b, k_b, gamma, s, lse, r, ds, *ctx.settings), None, None)


feedback_chunked_bwd = define_op(__name__, __file__, "feedback_chunked_bwd", _bwd_op,
                                 fake=_bwd_fake)
feedback_chunked_fwd = define_op(__name__, __file__, "feedback_chunked_fwd", _fwd_op,
                                 fake=_fwd_fake, backward=_backward_formula,
                                 setup_context=_setup_context)


def feedback_chunked(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, *,
                     scale: float | None = None, chunk_size: int = 64) -> Tensor:
    """Chunked feedback solve; returns ``s`` with the shape and dtype of ``f``.

    Differentiable with respect to q_b, k_b, gamma and f (custom backward, O(T D) saved state).
    ``chunk_size`` is the number of rows solved together; any positive value gives the same
    result up to rounding.
    """
    check_feedback_inputs(q_b, k_b, gamma, f)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    scale = q_b.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_b.shape[1] == 0:
        return f.clone()
    dt = accumulation_dtype(q_b, k_b, gamma, f)
    s, _, _ = feedback_chunked_fwd(q_b.to(dt), k_b.to(dt), gamma.to(dt), f.to(dt), scale,
                                   int(chunk_size))
    return s.to(f.dtype)
