"""Triton kernels of the chunked SSD (Mamba-2's state-space dual), forward and backward.

Imported lazily by ``ssd_triton``. Notation per batch b, head h (group g = h // heads_per_group)
and chunk k of length L (positions t0 = k L ... t0 + L - 1): ``acum`` is the in-chunk cumulative
log-decay (sum of dt A), ``alast`` its value at the chunk's last position, ``xdt = x dt``.

    states[k] = sum_s exp(alast - acum_s) xdt_s^T B_s                      (P, N)   chunk_state
    E[k+1]    = exp(alast[k]) E[k] + states[k],   E[0] = initial state             state_pass
    y_l       = sum_{s<=l} (C_l . B_s) exp(acum_l - acum_s) xdt_s
                + exp(acum_l) C_l E[k]^T                                          chunk_scan

Matrix products take their operands in the input dtype (bf16 in training: tensor cores) and
accumulate in float32; decays, states and the scan stay in float32. For float32 inputs the
products run in IEEE fp32 (``PREC``), so the interpreter tests compare against float64 tightly.
Rows past the true length T are loaded as zeros (and have dt = 0), so they add nothing.
The group kernels loop over the heads of one B/C group so ``C B^T`` is formed once per group.

Unused results get distinct names, never ``_``: to Triton's code generator ``_`` is an ordinary
variable, and one assigned a mask before a loop and a float inside it fails to compile
("loop-carried variable ... re-assigned"). The interpreter does not see this;
kernels/tests/test_triton_compiles.py compiles every kernel for sm90 on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decay_mask(acum_l, acum_s, offs_l, offs_s):
    """exp(acum_l - acum_s) for s <= l, else 0 (the exponent is masked before the exp)."""
    causal = offs_s[None, :] <= offs_l[:, None]
    diff = tl.where(causal, acum_l[:, None] - acum_s[None, :], float("-inf"))
    return tl.exp(diff)


@triton.jit
def _chunk_offsets(k, T, L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Chunk k's in-chunk offsets (L,), head-width (BP,) and state-width (BN,) offsets, its
    positions t and their mask t < T."""
    offs_l = tl.arange(0, L)
    t = k * L + offs_l
    return offs_l, tl.arange(0, BP), tl.arange(0, BN), t, t < T


@triton.jit
def _rows(ptr, bi, t, h, offs_p, s_b, s_t, s_h, s_p):
    """Offsets of the (L, BP) tile of head h at positions t in a (b, T, H, P) tensor with
    strides (s_b, s_t, s_h, s_p)."""
    return ptr + bi.to(tl.int64) * s_b + t[:, None] * s_t + h * s_h + offs_p[None, :] * s_p


@triton.jit
def _chunk_bc(b_ptr, c_ptr, bi, t, g, offs_n, tmask, N, sbb, sbt, sbg, sbn):
    """The chunk's (L, BN) tiles of B and C of group g (zeros past T), and their mask."""
    off = bi.to(tl.int64) * sbb + t[:, None] * sbt + g * sbg + offs_n[None, :] * sbn
    mask = tmask[:, None] & (offs_n[None, :] < N)
    return (tl.load(b_ptr + off, mask=mask, other=0.0),
            tl.load(c_ptr + off, mask=mask, other=0.0), mask)


@triton.jit
def _head_decays(acum_ptr, dt_ptr, base, offs_l, L: tl.constexpr):
    """acum (L,), its last value alast and dt (L,) of one head's chunk at ``base``."""
    return (tl.load(acum_ptr + base + offs_l), tl.load(acum_ptr + base + L - 1),
            tl.load(dt_ptr + base + offs_l))


@triton.jit
def _state_slot(bi, k, n_chunks, H, h, P, N):
    """Offset of the (P, N) state of (batch bi, chunk k, head h) in a (b, chunks, H, P, N)
    float32 tensor."""
    return ((bi.to(tl.int64) * n_chunks + k) * H + h) * P * N


@triton.jit
def chunk_state_fwd(x_ptr, dt_ptr, acum_ptr, b_ptr, st_ptr,
                    T, Tp, H, G, HG, P, N,
                    sxb, sxt, sxh, sxp, sbb, sbt, sbg, sbn,
                    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """states[b, k, h] = (w xdt)^T B over the chunk; grid (b * H, chunks)."""
    bh, k = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HG
    offs_l, offs_p, offs_n, t, tmask = _chunk_offsets(k, T, L, BP, BN)
    acum, alast, dt = _head_decays(acum_ptr, dt_ptr, bh.to(tl.int64) * Tp + k * L, offs_l, L)
    w = tl.exp(alast - acum) * dt
    x = tl.load(_rows(x_ptr, bi, t, h, offs_p, sxb, sxt, sxh, sxp),
                mask=tmask[:, None] & (offs_p[None, :] < P), other=0.0)
    bm, _b_again, _bm_mask = _chunk_bc(b_ptr, b_ptr, bi, t, g, offs_n, tmask, N,
                                      sbb, sbt, sbg, sbn)
    xw = (x.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
    st = tl.dot(tl.trans(xw), bm, input_precision=PREC)                 # (BP, BN)
    out = st_ptr + _state_slot(bi, k, Tp // L, H, h, P, N)
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], st,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def state_pass_fwd(st_ptr, acum_ptr, init_ptr, final_ptr,
                   Tp, H, PN, n_chunks,
                   L: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr):
    """In place: slot k of ``st`` turns from states[k] into the state entering chunk k; the
    state after the last chunk goes to ``final``. Grid (b * H, cdiv(P N, BLOCK))."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_INIT:
        state = tl.load(init_ptr + bh.to(tl.int64) * PN + offs, mask=mask, other=0.0)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_chunks):
        slot = st_ptr + ((bi.to(tl.int64) * n_chunks + k) * H + h) * PN + offs
        s_k = tl.load(slot, mask=mask, other=0.0)
        tl.store(slot, state, mask=mask)
        g_k = tl.exp(tl.load(acum_ptr + bh.to(tl.int64) * Tp + k * L + L - 1))
        state = g_k * state + s_k
    tl.store(final_ptr + bh.to(tl.int64) * PN + offs, state, mask=mask)


@triton.jit
def chunk_scan_fwd(x_ptr, dt_ptr, acum_ptr, b_ptr, c_ptr, ent_ptr, y_ptr,
                   T, Tp, H, G, HG, P, N,
                   sxb, sxt, sxh, sxp, sbb, sbt, sbg, sbn, syb, syt, syh, syp,
                   L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """y of one chunk for every head of one group; grid (b * G, chunks)."""
    bg, k = tl.program_id(0), tl.program_id(1)
    bi, g = bg // G, bg % G
    n_chunks = Tp // L
    offs_l, offs_p, offs_n, t, tmask = _chunk_offsets(k, T, L, BP, BN)
    bm, cm, _bc_mask = _chunk_bc(b_ptr, c_ptr, bi, t, g, offs_n, tmask, N, sbb, sbt, sbg, sbn)
    cb = tl.dot(cm, tl.trans(bm), input_precision=PREC)                 # (L, L)
    pmask = tmask[:, None] & (offs_p[None, :] < P)
    dtype = x_ptr.dtype.element_ty
    for hh in range(HG):
        h = g * HG + hh
        acum, _alast, dt = _head_decays(acum_ptr, dt_ptr, (bi.to(tl.int64) * H + h) * Tp + k * L,
                                   offs_l, L)
        x = tl.load(_rows(x_ptr, bi, t, h, offs_p, sxb, sxt, sxh, sxp), mask=pmask, other=0.0)
        xdt = (x.to(tl.float32) * dt[:, None]).to(dtype)
        m = (cb * _decay_mask(acum, acum, offs_l, offs_l)).to(dtype)
        y = tl.dot(m, xdt, input_precision=PREC)                          # (L, BP)
        ent = ent_ptr + _state_slot(bi, k, n_chunks, H, h, P, N)
        e_t = tl.load(ent + offs_p[None, :] * N + offs_n[:, None],
                      mask=(offs_p[None, :] < P) & (offs_n[:, None] < N), other=0.0)  # (BN, BP)
        y_off = tl.dot(cm, e_t.to(dtype), input_precision=PREC)
        y += tl.exp(acum)[:, None] * y_off
        tl.store(_rows(y_ptr, bi, t, h, offs_p, syb, syt, syh, syp),
                 y.to(y_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def chunk_dstate_bwd(dy_ptr, acum_ptr, c_ptr, out_ptr,
                     T, Tp, H, G, HG, P, N,
                     syb, syt, syh, syp, sbb, sbt, sbg, sbn,
                     L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """d(entering state) from chunk k's own outputs: (exp(acum) dy)^T C; grid (b * H, chunks)."""
    bh, k = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    g = h // HG
    offs_l, offs_p, offs_n, t, tmask = _chunk_offsets(k, T, L, BP, BN)
    acum = tl.load(acum_ptr + bh.to(tl.int64) * Tp + k * L + offs_l)
    dy = tl.load(_rows(dy_ptr, bi, t, h, offs_p, syb, syt, syh, syp),
                 mask=tmask[:, None] & (offs_p[None, :] < P), other=0.0)
    _c_again, cm, _cm_mask = _chunk_bc(c_ptr, c_ptr, bi, t, g, offs_n, tmask, N,
                                       sbb, sbt, sbg, sbn)
    dyw = (dy.to(tl.float32) * tl.exp(acum)[:, None]).to(c_ptr.dtype.element_ty)
    d = tl.dot(tl.trans(dyw), cm, input_precision=PREC)                 # (BP, BN)
    out = out_ptr + _state_slot(bi, k, Tp // L, H, h, P, N)
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], d,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def state_pass_bwd(d_ptr, ent_ptr, acum_ptr, dfinal_ptr, dinit_ptr, dg_ptr,
                   Tp, H, PN, n_chunks, n_blocks,
                   L: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr):
    """The adjoint of ``state_pass_fwd``, in reverse chunk order and in place: slot k of ``d``
    turns from the gradient of E[k] through chunk k's outputs into dstates[k] = dE[k+1]; also
    the partial sums dg[b h, blk, k] = sum(dE[k+1] * E[k]) over this block (gradient of the
    chunk decay exp(alast[k])) and dE[0] (the initial state's gradient)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    bi, h = bh // H, bh % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        g_next = tl.load(dfinal_ptr + bh.to(tl.int64) * PN + offs, mask=mask, other=0.0)
    else:
        g_next = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n_chunks):
        k = n_chunks - 1 - i
        off = ((bi.to(tl.int64) * n_chunks + k) * H + h) * PN + offs
        d_own = tl.load(d_ptr + off, mask=mask, other=0.0)
        tl.store(d_ptr + off, g_next, mask=mask)
        ent = tl.load(ent_ptr + off, mask=mask, other=0.0)
        tl.store(dg_ptr + (bh.to(tl.int64) * n_blocks + blk) * n_chunks + k,
                 tl.sum(g_next * ent, axis=0))
        g_k = tl.exp(tl.load(acum_ptr + bh.to(tl.int64) * Tp + k * L + L - 1))
        g_next = d_own + g_k * g_next
    tl.store(dinit_ptr + bh.to(tl.int64) * PN + offs, g_next, mask=mask)


@triton.jit
def chunk_dx_bwd(x_ptr, dt_ptr, acum_ptr, b_ptr, c_ptr, dy_ptr, ds_ptr, dx_ptr, ddt_ptr,
                 T, Tp, H, G, HG, P, N,
                 sxb, sxt, sxh, sxp, sbb, sbt, sbg, sbn, syb, syt, syh, syp,
                 sob, sot, soh, sop,
                 L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """dxdt = M^T dy + w (B dS^T) for every head of one group; writes dx = dxdt dt and
    ddt = sum_p dxdt x (the part through xdt). Grid (b * G, chunks)."""
    bg, k = tl.program_id(0), tl.program_id(1)
    bi, g = bg // G, bg % G
    n_chunks = Tp // L
    offs_l, offs_p, offs_n, t, tmask = _chunk_offsets(k, T, L, BP, BN)
    bm, cm, _bc_mask = _chunk_bc(b_ptr, c_ptr, bi, t, g, offs_n, tmask, N, sbb, sbt, sbg, sbn)
    bc = tl.dot(bm, tl.trans(cm), input_precision=PREC)                 # bc[s, l] = B_s . C_l
    pmask = tmask[:, None] & (offs_p[None, :] < P)
    dtype = x_ptr.dtype.element_ty
    for hh in range(HG):
        h = g * HG + hh
        base = (bi.to(tl.int64) * H + h) * Tp + k * L
        acum, alast, dt = _head_decays(acum_ptr, dt_ptr, base, offs_l, L)
        dy = tl.load(_rows(dy_ptr, bi, t, h, offs_p, syb, syt, syh, syp), mask=pmask,
                     other=0.0).to(dtype)
        # transposed decay: rows s, columns l >= s
        mt = (bc * tl.trans(_decay_mask(acum, acum, offs_l, offs_l))).to(dtype)
        dxdt = tl.dot(mt, dy, input_precision=PREC)                       # (L, BP)
        ds = ds_ptr + _state_slot(bi, k, n_chunks, H, h, P, N)
        ds_t = tl.load(ds + offs_p[None, :] * N + offs_n[:, None],
                       mask=(offs_p[None, :] < P) & (offs_n[:, None] < N), other=0.0)  # (BN, BP)
        dxdt += tl.exp(alast - acum)[:, None] * tl.dot(bm, ds_t.to(dtype), input_precision=PREC)
        x = tl.load(_rows(x_ptr, bi, t, h, offs_p, sxb, sxt, sxh, sxp), mask=pmask,
                    other=0.0).to(tl.float32)
        tl.store(_rows(dx_ptr, bi, t, h, offs_p, sob, sot, soh, sop),
                 (dxdt * dt[:, None]).to(dx_ptr.dtype.element_ty), mask=pmask)
        tl.store(ddt_ptr + base + offs_l, tl.sum(dxdt * x, axis=1))


@triton.jit
def chunk_dbc_bwd(x_ptr, dt_ptr, acum_ptr, b_ptr, c_ptr, dy_ptr, ent_ptr, ds_ptr,
                  db_ptr, dc_ptr, dacum_ptr,
                  T, Tp, H, G, HG, P, N,
                  sxb, sxt, sxh, sxp, sbb, sbt, sbg, sbn, syb, syt, syh, syp,
                  sob, sot, sog, son,
                  L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """dB, dC (summed over the group's heads) and d acum per head; grid (b * G, chunks).

    With dM = dy xdt^T and dCB = dM * decay (causal):
        dC = sum_h dCB B + exp(acum) (dy E)        dB = sum_h dCB^T C + w (xdt dS)
        d acum_l = rowsum(dCB * CB) - colsum(dCB * CB) + exp(acum_l) sum_n (dy E)_ln C_ln
                   - w_l sum_n (xdt dS)_ln B_ln, and + sum_l w_l sum_n (xdt dS)_ln B_ln at the
                   chunk's last position (through alast).
    ``db``/``dc`` are (b, T, G, N) with the strides so*.
    """
    bg, k = tl.program_id(0), tl.program_id(1)
    bi, g = bg // G, bg % G
    n_chunks = Tp // L
    offs_l, offs_p, offs_n, t, tmask = _chunk_offsets(k, T, L, BP, BN)
    bm, cm, bc_mask = _chunk_bc(b_ptr, c_ptr, bi, t, g, offs_n, tmask, N, sbb, sbt, sbg, sbn)
    cb = tl.dot(cm, tl.trans(bm), input_precision=PREC)                 # (L, L)
    pmask = tmask[:, None] & (offs_p[None, :] < P)
    pn_mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    dtype = x_ptr.dtype.element_ty
    dc = tl.zeros([L, BN], dtype=tl.float32)
    db = tl.zeros([L, BN], dtype=tl.float32)
    for hh in range(HG):
        h = g * HG + hh
        base = (bi.to(tl.int64) * H + h) * Tp + k * L
        acum, alast, dt = _head_decays(acum_ptr, dt_ptr, base, offs_l, L)
        x = tl.load(_rows(x_ptr, bi, t, h, offs_p, sxb, sxt, sxh, sxp), mask=pmask, other=0.0)
        xdt = (x.to(tl.float32) * dt[:, None]).to(dtype)
        dy = tl.load(_rows(dy_ptr, bi, t, h, offs_p, syb, syt, syh, syp), mask=pmask,
                     other=0.0).to(dtype)
        dm = tl.dot(dy, tl.trans(xdt), input_precision=PREC)              # (L, L)
        dcb = dm * _decay_mask(acum, acum, offs_l, offs_l)
        dcb_lo = dcb.to(dtype)
        hoff = _state_slot(bi, k, n_chunks, H, h, P, N)
        ent = tl.load(ent_ptr + hoff + offs_p[:, None] * N + offs_n[None, :], mask=pn_mask,
                      other=0.0)
        ds = tl.load(ds_ptr + hoff + offs_p[:, None] * N + offs_n[None, :], mask=pn_mask,
                     other=0.0)
        w = tl.exp(alast - acum)
        dy_e = tl.exp(acum)[:, None] * tl.dot(dy, ent.to(dtype), input_precision=PREC)
        xdt_ds = w[:, None] * tl.dot(xdt, ds.to(dtype), input_precision=PREC)
        dc += tl.dot(dcb_lo, bm, input_precision=PREC) + dy_e
        db += tl.dot(tl.trans(dcb_lo), cm, input_precision=PREC) + xdt_ds
        prod = dcb * cb
        through_state = tl.sum(xdt_ds * bm.to(tl.float32), axis=1)
        dacum = (tl.sum(prod, axis=1) - tl.sum(prod, axis=0)
                 + tl.sum(dy_e * cm.to(tl.float32), axis=1) - through_state)
        dacum += tl.where(offs_l == L - 1, tl.sum(through_state, axis=0), 0.0)
        tl.store(dacum_ptr + base + offs_l, dacum)
    out = bi.to(tl.int64) * sob + t[:, None] * sot + g * sog + offs_n[None, :] * son
    tl.store(db_ptr + out, db.to(db_ptr.dtype.element_ty), mask=bc_mask)
    tl.store(dc_ptr + out, dc.to(dc_ptr.dtype.element_ty), mask=bc_mask)
