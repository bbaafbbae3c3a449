"""Triton kernels of the Sessa feedback solve (imported lazily: this module needs triton).

Layout: q_b, k_b (B, T, DK) and f, s, u, r (B, T, D), all contiguous; per-row statistics
(B, T) in float32. Rows are cut into chunks of BM, channels into blocks of BD. Scores are kept
in log2 units (``scale * log2(e) * q . k``), so ``alpha = exp2(score - lse2)``.

Two solve kernels run as persistent, ordered tile queues: each program takes the next tile
(chunk, batch, channel block) from an atomic counter, so every tile it waits for was taken
earlier by a running program and the queue cannot deadlock. A tile accumulates the
contributions of finished chunks (waiting on their per-(batch, chunk, channel block) ready
flag, acquire) and publishes its own chunk (release) when solved. The in-chunk system
``(I - N) x = rhs`` (N strictly lower triangular, nilpotent) is solved by doubling:
``(I - N)^{-1} = (I + N)(I + N^2)(I + N^4)...``, log2(BM) small matrix products; or, in the
panel solves with ``solve="panel_inverse"``, by one product with that inverse, formed in the
parallel pass (``_unit_lower_inverse``).

* ``fwd_solve``: online (max, sum) softmax over the strict past, ``s``, the row log-sum-exp and
  ``r_t = sum_j alpha[t, j] s_j`` (for dgamma; from s as stored, i.e. rounded to the output
  dtype, the values the backward reads).
* ``bwd_solve``: the adjoint solve in reverse time, ``u = (I - B)^{-T} ds`` (= df), and
  ``dgamma_t = <u_t, r_t>`` (atomic sum over channel blocks; from u as stored). Both keep
  ``sum_j dlogit[t, j] = 0`` for the rounded u and s that ``bwd_dlogit_panel`` multiplies
  (kernels/NOTES.md, "Panel precision").
* ``bwd_dlogit_panel``: the softmax backward, ``dlogit = alpha * gamma * (u s^T - dgamma)``,
  fully parallel, one tile per program, into a panel of rows in the input dtype; dq and dk
  are then dense products of the panel (cuBLAS), without atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(a_ptr, b_ptr, row0, col0, T, DK: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr):
    """a[row0:row0+BM] @ b[col0:col0+BN]^T over the DK columns (rows >= T read as 0), fp32."""
    offs_m = row0 + tl.arange(0, BM)
    offs_n = col0 + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * DK + kk[None, :],
                    mask=(offs_m[:, None] < T) & (kk[None, :] < DK), other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * DK + kk[None, :],
                    mask=(offs_n[:, None] < T) & (kk[None, :] < DK), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _claim_tile(COUNTER, N_DBLK: tl.constexpr, B):
    """The next tile of an ordered queue over (chunk rank, batch, channel block): returns
    (channel block, batch as int64, rank). Programs take tiles in launch order, so a tile only
    waits on tiles already taken by running programs (no deadlock whatever the scheduling)."""
    tile = tl.atomic_add(COUNTER, 1)
    rest = tile // N_DBLK
    return tile % N_DBLK, (rest % B).to(tl.int64), rest // B


@triton.jit
def _wait(flag_ptr):
    while tl.atomic_add(flag_ptr, 0, sem="acquire") == 0:
        pass


@triton.jit
def _unit_lower_solve(nmat, rhs, LOG2_BM: tl.constexpr, PREC: tl.constexpr):
    """x = (I - nmat)^{-1} rhs for a nilpotent nmat (nmat^BM = 0), by doubling."""
    x = rhs
    npow = nmat
    for i in tl.static_range(LOG2_BM):
        x = x + tl.dot(npow, x, input_precision=PREC)
        if i + 1 < LOG2_BM:
            npow = tl.dot(npow, npow, input_precision=PREC)
    return x


@triton.jit
def _unit_lower_inverse(nmat, BM: tl.constexpr, LOG2_BM: tl.constexpr, PREC: tl.constexpr):
    """(I - nmat)^{-1} = (I + N)(I + N^2)(I + N^4)... for a nilpotent nmat, as a matrix: the
    panel solves form it in their parallel pass (``solve="panel_inverse"``), so a chunk's
    sequential step is one product instead of the 2 log2(BM) - 1 of the doubling."""
    ar = tl.arange(0, BM)
    inv = tl.where(ar[:, None] == ar[None, :], 1.0, 0.0) + nmat
    npow = nmat
    for _i in tl.static_range(LOG2_BM - 1):
        npow = tl.dot(npow, npow, input_precision=PREC)
        inv = inv + tl.dot(inv, npow, input_precision=PREC)
    return inv


@triton.jit
def fwd_solve(Q, K, G, F, S, R, LSE, FLAGS, COUNTER, T, B, n_chunks, scale_log2,
              DK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
              BD: tl.constexpr, N_DBLK: tl.constexpr, LOG2_BM: tl.constexpr,
              PREC: tl.constexpr):
    dblk, b, r = _claim_tile(COUNTER, N_DBLK, B)
    q_ptr = Q + b * T * DK
    k_ptr = K + b * T * DK
    s_ptr = S + b * T * D
    flag_ptr = FLAGS + (b * n_chunks) * N_DBLK + dblk
    ar = tl.arange(0, BM)
    offs_m = r * BM + ar
    offs_d = dblk * BD + tl.arange(0, BD)
    dmask = offs_d < D
    rmask = offs_m < T

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for c in range(r):
        sc = _scores(q_ptr, k_ptr, r * BM, c * BM, T, DK, BM, BM, BK) * scale_log2
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        corr = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None]
        m_i = m_new
        _wait(flag_ptr + c * N_DBLK)
        offs_n = c * BM + ar
        sv = tl.load(s_ptr + offs_n[:, None] * D + offs_d[None, :], mask=dmask[None, :],
                     other=0.0, cache_modifier=".cg")
        acc = tl.dot(p.to(sv.dtype), sv, acc)

    # The chunk itself: strict lower triangle of the diagonal score block.
    sc = _scores(q_ptr, k_ptr, r * BM, r * BM, T, DK, BM, BM, BK) * scale_log2
    strict = (ar[None, :] < ar[:, None]) & (offs_m[None, :] < T)
    sc = tl.where(strict, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows with no past
    corr = tl.exp2(m_i - m_safe)
    p = tl.where(strict, tl.exp2(sc - m_safe[:, None]), 0.0)
    l_i = l_i * corr + tl.sum(p, 1)
    acc = acc * corr[:, None]
    has_past = l_i > 0
    inv_l = tl.where(has_past, 1.0 / tl.where(has_past, l_i, 1.0), 0.0)
    g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
    coef = g * inv_l
    io_mask = rmask[:, None] & dmask[None, :]
    io_off = offs_m[:, None] * D + offs_d[None, :]
    f = tl.load(F + b * T * D + io_off, mask=io_mask, other=0.0).to(tl.float32)
    x = _unit_lower_solve(p * coef[:, None], f + coef[:, None] * acc, LOG2_BM, PREC)
    x = _store_solved(s_ptr + io_off, x, io_mask)
    # Later chunks wait only for s: publish it first, then the r and lse no chunk reads.
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr + r * N_DBLK, 1, sem="release")
    rr = (acc + tl.dot(p, x, input_precision=PREC)) * inv_l[:, None]
    tl.store(R + b * T * D + io_off, rr, mask=io_mask)
    if dblk == 0:
        lse = tl.where(has_past, m_safe + tl.log2(tl.where(has_past, l_i, 1.0)), float("inf"))
        tl.store(LSE + b * T + offs_m, lse, mask=rmask)


@triton.jit
def _store_solved(ptr, x, mask):
    """Store the float32 solution x of a chunk in the output dtype and return the stored
    (rounded) values in float32: the rest of the tile (r, dgamma) computes with what the
    backward's dq/dk kernel will read (kernels/NOTES.md, "Panel precision")."""
    xs = x.to(ptr.dtype.element_ty)
    tl.store(ptr, xs, mask=mask)
    return xs.to(tl.float32)


@triton.jit
def _bwd_finish_chunk(p, acc, G, DS, U, R, DG, flag, b, T, offs_n, nmask, offs_d, dmask,
                      D: tl.constexpr, LOG2_BM: tl.constexpr, PREC: tl.constexpr,
                      INVERSE: tl.constexpr):
    """The end of one adjoint-solve tile (column chunk ``offs_n``, channels ``offs_d``, batch
    ``b``), shared by ``bwd_solve`` and the panel kernel ``bwd_panel_solve``: p is the chunk's
    strict-lower alpha tile (float32) and acc the float32 sum over the later chunks of
    alpha^T (gamma u). Solves u = (I - (diag(gamma) p)^T)^{-1} (ds + acc), stores u, releases
    the tile's ready ``flag`` and adds dgamma_t += <u_t, r_t> over this channel block (u as
    stored). With INVERSE, p is that inverse already (``_unit_lower_inverse``, transposed)."""
    io_mask = nmask[:, None] & dmask[None, :]
    io_off = offs_n[:, None] * D + offs_d[None, :]
    rhs = tl.load(DS + b * T * D + io_off, mask=io_mask, other=0.0).to(tl.float32) + acc
    if INVERSE:
        u = tl.dot(p, rhs, input_precision=PREC)
    else:
        g = tl.load(G + b * T + offs_n, mask=nmask, other=0.0).to(tl.float32)
        u = _unit_lower_solve(tl.trans(p * g[:, None]), rhs, LOG2_BM, PREC)
    u = _store_solved(U + b * T * D + io_off, u, io_mask)
    # Earlier chunks wait only for u: publish it first, then add this block's dgamma.
    tl.debug_barrier()
    tl.atomic_xchg(flag, 1, sem="release")
    rr = tl.load(R + b * T * D + io_off, mask=io_mask, other=0.0)
    tl.atomic_add(DG + b * T + offs_n, tl.sum(u * rr, 1), mask=nmask)


@triton.jit
def bwd_solve(Q, K, G, DS, U, R, LSE, DG, FLAGS, COUNTER, T, B, n_chunks, scale_log2,
              DK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
              BD: tl.constexpr, N_DBLK: tl.constexpr, LOG2_BM: tl.constexpr,
              PREC: tl.constexpr):
    dblk, b, rank = _claim_tile(COUNTER, N_DBLK, B)
    c = n_chunks - 1 - rank
    q_ptr = Q + b * T * DK
    k_ptr = K + b * T * DK
    u_ptr = U + b * T * D
    flag_ptr = FLAGS + (b * n_chunks) * N_DBLK + dblk
    ar = tl.arange(0, BM)
    offs_n = c * BM + ar
    offs_d = dblk * BD + tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < T

    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i in range(n_chunks - 1 - c):
        r = n_chunks - 1 - i
        offs_m = r * BM + ar
        rmask = offs_m < T
        sc = _scores(q_ptr, k_ptr, r * BM, c * BM, T, DK, BM, BM, BK) * scale_log2
        lse = tl.load(LSE + b * T + offs_m, mask=rmask, other=float("inf"))
        p = tl.exp2(sc - lse[:, None])
        g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
        _wait(flag_ptr + r * N_DBLK)
        u = tl.load(u_ptr + offs_m[:, None] * D + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
        w = (u.to(tl.float32) * g[:, None]).to(u.dtype)
        acc = tl.dot(tl.trans(p.to(u.dtype)), w, acc)

    sc = _scores(q_ptr, k_ptr, c * BM, c * BM, T, DK, BM, BM, BK) * scale_log2
    lse = tl.load(LSE + b * T + offs_n, mask=nmask, other=float("inf"))
    strict = (ar[None, :] < ar[:, None]) & (offs_n[None, :] < T)
    p = tl.where(strict, tl.exp2(sc - lse[:, None]), 0.0)
    _bwd_finish_chunk(p, acc, G, DS, U, R, DG, flag_ptr + c * N_DBLK, b, T, offs_n, nmask,
                      offs_d, dmask, D, LOG2_BM, PREC, False)


@triton.jit
def bwd_dlogit_panel(Q, K, G, U, S, LSE, DG, P, T, row0, W, T_PAD, scale_log2, scale,
                     DK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Program (row chunk i of the panel, column chunk c, batch): the softmax backward tile
    ``dlogit = alpha * gamma * scale * (u s^T - dgamma)`` of rows ``row0 + i*BM ..`` against
    columns ``c*BM ..``, computed in float32 (contractions over DK and D) and stored into the
    panel P (B, W, T_PAD) in P's dtype. Tiles above the diagonal, padded rows and padded
    columns are zeros, so dq and dk are two dense products of the panel (``dq = P k``,
    ``dk = P^T q``) that cuBLAS runs on the tensor cores."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = row0 // BM + i
    ar = tl.arange(0, BM)
    out = P + b * W * T_PAD + (i * BM + ar)[:, None] * T_PAD + (c * BM + ar)[None, :]
    if c > r:
        tl.store(out, tl.zeros([BM, BM], dtype=tl.float32).to(P.dtype.element_ty))
    else:
        offs_m = r * BM + ar
        offs_n = c * BM + ar
        rmask = offs_m < T
        nmask = offs_n < T
        sc = _scores(Q + b * T * DK, K + b * T * DK, r * BM, c * BM, T, DK, BM, BM, BK) \
            * scale_log2
        lse = tl.load(LSE + b * T + offs_m, mask=rmask, other=float("inf"))
        strict = (offs_n[None, :] < offs_m[:, None]) & nmask[None, :]
        p = tl.where(strict, tl.exp2(sc - lse[:, None]), 0.0)
        gu = _scores(U + b * T * D, S + b * T * D, r * BM, c * BM, T, D, BM, BM, BK)
        g = tl.load(G + b * T + offs_m, mask=rmask, other=0.0).to(tl.float32)
        dg = tl.load(DG + b * T + offs_m, mask=rmask, other=0.0)
        dl = p * (g * scale)[:, None] * (gu - dg[:, None])
        tl.store(out, dl.to(P.dtype.element_ty))
