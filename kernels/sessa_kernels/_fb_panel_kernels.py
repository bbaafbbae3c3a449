"""Triton kernels of the "panel" variant of the two feedback solves (``solve="panel"``, the default).

The queue solves in ``_fb_kernels`` recompute the BM x BM score tile (a DK-long contraction)
in every channel-block program: N_DBLK times per tile. Here the scores of a *super-chunk* of
W rows (forward) or W columns (adjoint) are computed once, fully in parallel, into a scratch
panel; the sequential blocked substitution then reads the tiles (L2 / HBM) instead of
recomputing them. Per super-chunk:

forward (rows [r0*BM, r0*BM + W), all past columns):
  1. ``fwd_panel_scores``, one program per tile (row chunk r, column chunk c <= r, batch):
     ``P = exp2(score - m)`` with ``m`` the row max over the tile, stored in the input dtype
     (diagonal tiles, strict lower, in float32 to a separate (B, T, BM) scratch, so the
     in-chunk solve keeps float32 coefficients as in the queue kernel), and the per-row tile
     statistics (m, sum P) in float32.
  2. ``fwd_panel_lse``, one program per (row chunk, batch): merges the tile statistics into
     the row log-sum-exp over the strict past (log2 units, +inf for row 0).
  3. ``fwd_panel_solve``: the ordered tile queue of ``fwd_solve`` (chunk, batch, channel
     block) with ``alpha_c = P_c * exp2(m_c - lse)`` read from the panel: the row factor is
     applied to the fp32 product ``P_c @ s_c``, so P is rounded once, as in ``fwd_solve``.
     The past products run in the input dtype (bf16 operands, as in the queue kernels).
adjoint (column chunks [c_lo, c_hi), W = (c_hi - c_lo) BM, all later rows, super-chunks in
reverse time):
  1. ``bwd_panel_scores``: ``alpha = exp2(score - lse)`` for each tile (row chunk r >= c,
     column chunk c in the super-chunk), the lse saved by the forward.
  2. ``bwd_panel_solve``: ``bwd_solve`` with the tiles read from the panel (the same tail,
     ``_fb_kernels._bwd_finish_chunk``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sessa_kernels._fb_kernels import (
    _bwd_finish_chunk,
    _claim_tile,
    _scores,
    _store_solved,
    _unit_lower_inverse,
    _unit_lower_solve,
    _wait,
)


@triton.jit
def _tile_scores(Q, K, b, r, c, T, scale_log2, DK: tl.constexpr, BM: tl.constexpr,
                 BK: tl.constexpr):
    """Scores (log2 units) of row chunk r against column chunk c <= r of batch b, -inf outside
    the strict lower triangle on the diagonal tile (c == r) and at columns >= T. Returns
    (scores, arange(BM), row offsets, column offsets, row mask)."""
    ar = tl.arange(0, BM)
    offs_m = r * BM + ar
    offs_n = c * BM + ar
    sc = _scores(Q + b * T * DK, K + b * T * DK, r * BM, c * BM, T, DK, BM, BM,
                 BK) * scale_log2
    if c == r:
        valid = (offs_n[None, :] < offs_m[:, None]) & (offs_n[None, :] < T)
        sc = tl.where(valid, sc, float("-inf"))
    return sc, ar, offs_m, offs_n, offs_m < T


@triton.jit
def fwd_panel_scores(Q, K, PANEL, DIAG, STM, STL, T, W, T_PAD, NC, r0, scale_log2,
                     DK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Program (local row chunk i, column chunk c, batch). PANEL (B, W, T_PAD): row i*BM + t
    of the super-chunk vs column c*BM + j. DIAG (B, T_PAD, BM) fp32. STM, STL (B, W, NC)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = r0 + i
    if c <= r:
        sc, ar, offs_m, offs_n, rmask = _tile_scores(Q, K, b, r, c, T, scale_log2, DK, BM, BK)
        m = tl.max(sc, 1)                                   # -inf: row has no entry here
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(sc - m_safe[:, None])                   # exp2(-inf) = 0 off the triangle
        loc = i * BM + ar                                   # row inside the super-chunk
        st_off = b * W * NC + loc.to(tl.int64) * NC + c
        tl.store(STM + st_off, m, mask=rmask)
        tl.store(STL + st_off, tl.sum(p, 1), mask=rmask)
        if c == r:
            tl.store(DIAG + b * T_PAD * BM + offs_m[:, None] * BM + ar[None, :], p,
                     mask=rmask[:, None])
        else:
            tl.store(PANEL + b * W * T_PAD + loc.to(tl.int64)[:, None] * T_PAD
                     + offs_n[None, :], p.to(PANEL.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def fwd_panel_lse(STM, STL, LSE, DIAG, INV, G, T, W, T_PAD, NC, r0, BM: tl.constexpr,
                  BC: tl.constexpr, LOG2_BM: tl.constexpr, PREC: tl.constexpr,
                  INVERSE: tl.constexpr):
    """Program (local row chunk i, batch): lse2 = M + log2(sum_c l_c exp2(m_c - M)) over the
    column chunks c <= r of the tile statistics; +inf where the row has no past (row 0).
    With INVERSE also the chunk's (I - diag(gamma) alpha_rr)^{-1} into INV (B, T_PAD, BM)."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r = r0 + i
    ar = tl.arange(0, BM)
    offs_m = r * BM + ar
    rmask = offs_m < T
    row_off = b * W * NC + (i * BM + ar).to(tl.int64) * NC
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, r + 1, BC):
        cc = c0 + tl.arange(0, BC)
        msk = rmask[:, None] & (cc[None, :] <= r)
        m = tl.load(STM + row_off[:, None] + cc[None, :], mask=msk, other=float("-inf"))
        lt = tl.load(STL + row_off[:, None] + cc[None, :], mask=msk, other=0.0)
        m_new = tl.maximum(m_i, tl.max(m, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(lt * tl.exp2(m - m_safe[:, None]), 1)
        m_i = m_new
    has_past = l_i > 0
    lse = tl.where(has_past, m_i + tl.log2(tl.where(has_past, l_i, 1.0)), float("inf"))
    tl.store(LSE + b * T + offs_m, lse, mask=rmask)
    if INVERSE:
        m = tl.load(STM + row_off + r, mask=rmask, other=float("-inf"))
        fac = tl.where(lse == float("inf"), 0.0, tl.exp2(m - lse))
        g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
        tile = b * T_PAD * BM + offs_m[:, None] * BM + ar[None, :]
        p = tl.load(DIAG + tile, mask=rmask[:, None], other=0.0)
        inv = _unit_lower_inverse(p * (fac * g)[:, None], BM, LOG2_BM, PREC)
        tl.store(INV + tile, inv, mask=rmask[:, None])


@triton.jit
def fwd_panel_solve(G, F, S, R, LSE, PANEL, DIAG, INV, STM, FLAGS, COUNTER, T, B, W, T_PAD,
                    NC, r0, n_local, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                    N_DBLK: tl.constexpr, LOG2_BM: tl.constexpr, PREC: tl.constexpr,
                    INVERSE: tl.constexpr):
    """Ordered tile queue over (local chunk, batch, channel block), as ``fwd_solve``. With
    INVERSE the chunk's inverse comes from INV (``fwd_panel_lse``): one product per step."""
    dblk, b, i = _claim_tile(COUNTER, N_DBLK, B)
    r = r0 + i
    s_ptr = S + b * T * D
    flag_ptr = FLAGS + (b * NC) * N_DBLK + dblk
    ar = tl.arange(0, BM)
    offs_m = r * BM + ar
    offs_d = dblk * BD + tl.arange(0, BD)
    dmask = offs_d < D
    rmask = offs_m < T
    loc = (i * BM + ar).to(tl.int64)
    st_row = STM + b * W * NC + loc * NC
    p_row = PANEL + b * W * T_PAD + loc * T_PAD
    # lse of row 0 is +inf; rows >= T read as +inf too, so their factors are 0.
    lse = tl.load(LSE + b * T + offs_m, mask=rmask, other=float("inf"))

    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for c in range(r):
        offs_n = c * BM + ar
        p = tl.load(p_row[:, None] + offs_n[None, :], mask=rmask[:, None], other=0.0)
        m = tl.load(st_row + c, mask=rmask, other=float("-inf"))
        _wait(flag_ptr + c * N_DBLK)
        sv = tl.load(s_ptr + offs_n[:, None] * D + offs_d[None, :], mask=dmask[None, :],
                     other=0.0, cache_modifier=".cg")
        acc += tl.exp2(m - lse)[:, None] * tl.dot(p, sv.to(p.dtype))

    # The chunk itself: float32 strict-lower tile, normalised to alpha.
    m = tl.load(st_row + r, mask=rmask, other=float("-inf"))
    fac = tl.where(lse == float("inf"), 0.0, tl.exp2(m - lse))
    tile = b * T_PAD * BM + offs_m[:, None] * BM + ar[None, :]
    g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
    io_mask = rmask[:, None] & dmask[None, :]
    io_off = offs_m[:, None] * D + offs_d[None, :]
    f = tl.load(F + b * T * D + io_off, mask=io_mask, other=0.0).to(tl.float32)
    rhs = f + g[:, None] * acc
    if INVERSE:
        x = tl.dot(tl.load(INV + tile, mask=rmask[:, None], other=0.0), rhs,
                   input_precision=PREC)
    else:
        p = tl.load(DIAG + tile, mask=rmask[:, None], other=0.0) * fac[:, None]
        x = _unit_lower_solve(p * g[:, None], rhs, LOG2_BM, PREC)
    x = _store_solved(s_ptr + io_off, x, io_mask)
    # Later chunks wait only for s: publish it first, then the r no chunk reads.
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr + r * N_DBLK, 1, sem="release")
    if INVERSE:
        p = tl.load(DIAG + tile, mask=rmask[:, None], other=0.0) * fac[:, None]
    rr = acc + tl.dot(p, x, input_precision=PREC)
    tl.store(R + b * T * D + io_off, rr, mask=io_mask)


@triton.jit
def bwd_panel_scores(Q, K, LSE, G, PANEL, DIAG, T, W, T_PAD, c_lo, scale_log2,
                     DK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                     LOG2_BM: tl.constexpr, PREC: tl.constexpr, INVERSE: tl.constexpr):
    """Program (row chunk r = c_lo + i, local column chunk j, batch): alpha of rows r against
    columns c = c_lo + j <= r. PANEL (B, T_PAD, W), absolute rows; DIAG (B, T_PAD, BM) fp32:
    the diagonal alpha tile, or with INVERSE the transposed (I - diag(gamma) alpha)^{-1}."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = c_lo + i
    c = c_lo + j
    if c <= r:
        sc, ar, offs_m, _offs_n, rmask = _tile_scores(Q, K, b, r, c, T, scale_log2, DK, BM, BK)
        lse = tl.load(LSE + b * T + offs_m, mask=rmask, other=float("inf"))
        p = tl.exp2(sc - lse[:, None])          # 0 where the score is -inf (lse is never -inf)
        if c == r:
            if INVERSE:
                g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
                p = tl.trans(_unit_lower_inverse(p * g[:, None], BM, LOG2_BM, PREC))
            tl.store(DIAG + b * T_PAD * BM + offs_m[:, None] * BM + ar[None, :], p,
                     mask=rmask[:, None])
        else:
            tl.store(PANEL + b * T_PAD * W + offs_m.to(tl.int64)[:, None] * W
                     + (j * BM + ar)[None, :], p.to(PANEL.dtype.element_ty),
                     mask=rmask[:, None])


@triton.jit
def bwd_panel_solve(G, DS, U, R, DG, PANEL, DIAG, FLAGS, COUNTER, T, B, W, T_PAD, n_chunks,
                    c_lo, c_hi, D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                    N_DBLK: tl.constexpr, LOG2_BM: tl.constexpr, PREC: tl.constexpr,
                    INVERSE: tl.constexpr):
    """Ordered tile queue in reverse time over the column chunks [c_lo, c_hi) of the
    super-chunk, as ``bwd_solve``."""
    dblk, b, rank = _claim_tile(COUNTER, N_DBLK, B)
    c = c_hi - 1 - rank
    j = c - c_lo                                # column chunk inside the panel
    u_ptr = U + b * T * D
    flag_ptr = FLAGS + (b * n_chunks) * N_DBLK + dblk
    ar = tl.arange(0, BM)
    offs_n = c * BM + ar
    offs_d = dblk * BD + tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < T
    p_col = PANEL + b * T_PAD * W + j * BM + ar

    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for k in range(n_chunks - 1 - c):
        r = n_chunks - 1 - k
        offs_m = r * BM + ar
        rmask = offs_m < T
        p = tl.load(p_col[None, :] + offs_m.to(tl.int64)[:, None] * W, mask=rmask[:, None],
                    other=0.0)
        g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
        _wait(flag_ptr + r * N_DBLK)
        u = tl.load(u_ptr + offs_m[:, None] * D + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
        w = (u.to(tl.float32) * g[:, None]).to(p.dtype)
        acc = tl.dot(tl.trans(p), w, acc)

    p = tl.load(DIAG + b * T_PAD * BM + offs_n[:, None] * BM + ar[None, :],
                mask=nmask[:, None], other=0.0)
    _bwd_finish_chunk(p, acc, G, DS, U, R, DG, flag_ptr + c * N_DBLK, b, T, offs_n, nmask,
                      offs_d, dmask, D, LOG2_BM, PREC, INVERSE)
