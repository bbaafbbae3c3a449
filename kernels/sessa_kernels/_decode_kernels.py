"""Triton kernels of the fused feedback decode step (imported lazily: needs triton).

``decode_split``: program (b, split) streams its split's keys once (scores, log2 units, to a
float32 scratch; max and sum of exp over the split), then its values once per channel block,
writing an unnormalised partial read. ``decode_merge``: rescales the splits to the global max,
normalises and adds f_t.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_split(Q, K, S, SC, M, L, PART, P, stride_kb, stride_sb, n_split, per_split,
                 scale_log2,
                 DK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, P)
    offs_k = tl.arange(0, BK)
    sc_ptr = SC + b * n_split * per_split
    m_i = tl.max(tl.full([BN], float("-inf"), tl.float32), 0)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < hi
        acc = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, DK, BK):
            kk = k0 + offs_k
            q = tl.load(Q + b * DK + kk, mask=kk < DK, other=0.0).to(tl.float32)
            kv = tl.load(K + b * stride_kb + offs_n[:, None] * DK + kk[None, :],
                         mask=nmask[:, None] & (kk[None, :] < DK), other=0.0)
            acc += tl.sum(kv.to(tl.float32) * q[None, :], 1)
        acc = tl.where(nmask, acc * scale_log2, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(acc, 0))
        tl.store(sc_ptr + offs_n, acc, mask=nmask)
    tl.debug_barrier()
    l_i = tl.sum(tl.zeros([BN], dtype=tl.float32), 0)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        p = tl.load(sc_ptr + offs_n, mask=offs_n < hi, other=float("-inf"))
        l_i += tl.sum(tl.exp2(p - m_i), 0)
    tl.store(M + b * n_split + sp, m_i)
    tl.store(L + b * n_split + sp, l_i)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        acc_d = tl.zeros([BD], dtype=tl.float32)
        for n0 in range(lo, hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < hi
            p = tl.exp2(tl.load(sc_ptr + offs_n, mask=nmask, other=float("-inf")) - m_i)
            sv = tl.load(S + b * stride_sb + offs_n[:, None] * D + offs_d[None, :],
                         mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc_d += tl.sum(sv.to(tl.float32) * p[:, None], 0)
        tl.store(PART + (b * n_split + sp) * D + offs_d, acc_d, mask=dmask)


@triton.jit
def decode_merge(M, L, PART, G, F, OUT, n_split, D: tl.constexpr, BD: tl.constexpr,
                 NS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_s = tl.arange(0, NS)
    smask = offs_s < n_split
    m = tl.load(M + b * n_split + offs_s, mask=smask, other=float("-inf"))
    m_all = tl.max(m, 0)
    w = tl.where(smask, tl.exp2(m - m_all), 0.0)
    l_all = tl.sum(w * tl.load(L + b * n_split + offs_s, mask=smask, other=0.0), 0)
    part = tl.load(PART + (b * n_split + offs_s[:, None]) * D + offs_d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    read = tl.sum(part * w[:, None], 0) / l_all
    g = tl.load(G + b).to(tl.float32)
    f = tl.load(F + b * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(OUT + b * D + offs_d, (f + g * read).to(OUT.dtype.element_ty), mask=dmask)
