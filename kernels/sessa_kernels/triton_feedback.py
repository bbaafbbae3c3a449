"""The Sessa feedback solve as fused Triton kernels, forward and backward.

``feedback_triton(q_b, k_b, gamma, f)`` solves ``(I - B_fb) s = f`` with
``B_fb[t, j] = gamma_t softmax_{j<t}(scale q_b[t] . k_b[j])`` like
``sessa_pt.models.feedback.feedback_dense``, without a T x T tensor: the routing scores, the
normaliser over the strict past, gamma and the blocked solve are fused (``_fb_kernels``,
``_fb_panel_kernels``); the backward is the adjoint solve in reverse time (which also gives
dgamma) and the softmax backward for dq and dk (``bwd_dlogit_panel``, then two GEMMs). Operands of the
matrix products are in the input dtype (bf16 in training), accumulation and the in-chunk
solves in float32. Saved for backward: q_b, k_b, gamma, s and, in float32, the row
log-sum-exp (B, T, log2 units) and r = alpha @ s (B, T, D): O(T D) memory. r and dgamma are
computed from s and u as stored (rounded to the input dtype), the values the dq/dk kernel
reads (kernels/NOTES.md, "Panel precision").

Two variants of the forward and adjoint solves, with the same outputs and gradients:
``solve="panel"`` (default; ``_fb_panel_kernels``: the scores once per super-chunk of W rows
into a scratch panel of B x W x T_pad elements in the input dtype, O(W T) and at most
``panel_mib`` MiB, see ``panel_width``; never T x T unless that fits the budget) and
``solve="queue"`` (``_fb_kernels``: the score tile recomputed by every channel-block program,
no scratch). On the H200 the panel layer takes 0.73-0.98x the queue layer's time
(BENCHMARKS.md). ``solve="panel_inverse"`` is the panel solve with each chunk's in-chunk
system inverted in the parallel pass (``_fb_kernels._unit_lower_inverse``): a chunk's step on
the sequential path is then one product instead of the doubling's 2 log2(block_m) - 1, at the
cost of one more (B, T_pad, block_m) float32 scratch. Its products round differently (tf32),
so its results differ from "panel" by about the doubling's own rounding.

The forward and the backward are PyTorch custom operators, ``sessa::feedback_triton_fwd`` and
``sessa::feedback_triton_bwd`` (defined through ``sessa_kernels.oplib``), with fake
implementations (shapes, dtypes, contiguous strides) and the autograd formula registered:
torch.compile keeps each as one opaque call and compiles everything around it (tracing into
the kernel launches would make inductor re-lower our ``tl.dot`` calls, which fails). The real
implementations make every input contiguous, as the kernels index with dense row-major offsets,
whatever layout the compiled graph hands them.

Triton is imported lazily, so ``import sessa_kernels`` works without it. On a machine without
CUDA the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the
first import of triton (slow: tests only).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from sessa_kernels.chunked import check_feedback_inputs
from sessa_kernels.oplib import define_op

LOG2E = 1.4426950408889634
SOLVES = ("panel", "panel_inverse", "queue")
PANEL_SOLVES = ("panel", "panel_inverse")


def _interpreting() -> bool:
    # Triton's own switch for running kernels on the CPU (tests), not a kernel setting.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(T: int, D: int, block_m: int | None, block_d: int | None) -> tuple[int, int]:
    bm = block_m or 64
    bd = block_d or min(128, max(16, triton_next_pow2(D)))
    return bm, bd


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bk(dk: int) -> int:
    return min(64, max(16, triton_next_pow2(dk)))


def panel_width(B: int, T: int, block_m: int, elem_bytes: int,
                panel_rows: int | None = None, panel_mib: float = 256.0) -> int:
    """Rows (forward) / columns (adjoint) W of one super-chunk of the panel solve: a multiple
    of block_m, at most T rounded up to block_m. Default: the largest W whose scratch,
    B * W * T_pad panel elements plus 8 bytes of tile statistics per row and column chunk,
    fits ``panel_mib`` MiB (``model.sessa.panel_mib``), and at least block_m."""
    t_pad = math.ceil(T / block_m) * block_m
    if panel_rows is None:
        per_row = B * t_pad * (elem_bytes + 8 / block_m)
        panel_rows = int(panel_mib * 2**20 // per_row)
    w = max(block_m, panel_rows // block_m * block_m)
    return min(w, t_pad)


class _Cfg(NamedTuple):
    """Settings of one feedback_triton call, shared by its forward and backward."""
    scale: float
    block_m: int
    block_d: int
    prec: str                      # input_precision of the float32 in-chunk products
    solve: str                     # "panel", "panel_inverse" or "queue"
    panel_rows: int | None         # W of the panel solves (None: from panel_mib)
    panel_mib: float               # scratch budget of the panel solves
    panel_dtype: torch.dtype       # element type of the off-diagonal panel scratch (input's)

    def kernel_args(self) -> dict:
        bm = self.block_m
        return {"BM": bm, "BD": self.block_d, "LOG2_BM": int(math.log2(bm)), "PREC": self.prec,
                "num_warps": 8 if self.block_d >= 256 else 4}


def _panel_geometry(q, values, cfg: _Cfg):
    """Sizes shared by both panel solves: (B, T, Dk, D, chunks, padded T, channel blocks, W,
    chunks per super-chunk)."""
    B, T, DK = q.shape
    D = values.shape[-1]
    bm = cfg.block_m
    nc = math.ceil(T / bm)
    W = panel_width(B, T, bm, cfg.panel_dtype.itemsize, cfg.panel_rows, cfg.panel_mib)
    return B, T, DK, D, nc, nc * bm, math.ceil(D / cfg.block_d), W, W // bm


def _fwd_panel(q, k, g, f, s, r, lse, flags, cfg: _Cfg):
    """Forward solve by super-chunks of W rows (``_fb_panel_kernels``): per super-chunk the
    P tiles against all past columns once (parallel), the row lse, then the ordered queue.
    Scratch: panel B x W x T_pad (``cfg.panel_dtype``) + tile stats 2 x B x W x T_pad/bm (fp32)
    + diagonal tiles B x T_pad x bm (fp32): O(W T), never T x T unless W = T fits the budget."""
    from sessa_kernels import _fb_panel_kernels as pk

    B, T, DK, D, nc, t_pad, n_dblk, W, nw = _panel_geometry(q, f, cfg)
    bm, dev = cfg.block_m, q.device
    panel = torch.empty(B, W, t_pad, dtype=cfg.panel_dtype, device=dev)
    stm = torch.empty(B, W, nc, dtype=torch.float32, device=dev)
    stl = torch.empty(B, W, nc, dtype=torch.float32, device=dev)
    diag = torch.empty(B, t_pad, bm, dtype=torch.float32, device=dev)
    inverse = cfg.solve == "panel_inverse"
    inv = torch.empty_like(diag) if inverse else diag
    counters = torch.zeros(math.ceil(nc / nw), dtype=torch.int32, device=dev)
    kw = cfg.kernel_args()
    for j, r0 in enumerate(range(0, nc, nw)):
        n_local = min(nw, nc - r0)
        pk.fwd_panel_scores[(n_local, r0 + n_local, B)](
            q, k, panel, diag, stm, stl, T, W, t_pad, nc, r0, cfg.scale * LOG2E,
            DK=DK, BM=bm, BK=_bk(DK), num_warps=4)
        pk.fwd_panel_lse[(n_local, B)](
            stm, stl, lse, diag, inv, g, T, W, t_pad, nc, r0, BM=bm, BC=64,
            LOG2_BM=kw["LOG2_BM"], PREC=kw["PREC"], INVERSE=inverse, num_warps=4)
        pk.fwd_panel_solve[(n_local * B * n_dblk,)](
            g, f, s, r, lse, panel, diag, inv, stm, flags, counters[j:], T, B, W, t_pad, nc,
            r0, n_local, D=D, N_DBLK=n_dblk, INVERSE=inverse, **kw)


def _bwd_panel(q, k, g, ds, u, r, lse, dg, flags, cfg: _Cfg):
    """Adjoint solve by super-chunks of W columns in reverse time: per super-chunk alpha of all
    later rows against its columns once (parallel, from the saved lse), then the ordered
    queue. Scratch: panel B x T_pad x W (``cfg.panel_dtype``) + diagonal tiles B x T_pad x bm
    (fp32)."""
    from sessa_kernels import _fb_panel_kernels as pk

    B, T, DK, D, nc, t_pad, n_dblk, W, nw = _panel_geometry(q, u, cfg)
    bm, dev = cfg.block_m, q.device
    panel = torch.empty(B, t_pad, W, dtype=cfg.panel_dtype, device=dev)
    diag = torch.empty(B, t_pad, bm, dtype=torch.float32, device=dev)
    inverse = cfg.solve == "panel_inverse"
    counters = torch.zeros(math.ceil(nc / nw), dtype=torch.int32, device=dev)
    kw = cfg.kernel_args()
    for j, c_hi in enumerate(range(nc, 0, -nw)):
        c_lo = max(0, c_hi - nw)
        pk.bwd_panel_scores[(nc - c_lo, c_hi - c_lo, B)](
            q, k, lse, g, panel, diag, T, W, t_pad, c_lo, cfg.scale * LOG2E,
            DK=DK, BM=bm, BK=_bk(DK), LOG2_BM=kw["LOG2_BM"], PREC=kw["PREC"],
            INVERSE=inverse, num_warps=4)
        pk.bwd_panel_solve[((c_hi - c_lo) * B * n_dblk,)](
            g, ds, u, r, dg, panel, diag, flags, counters[j:], T, B, W, t_pad, nc, c_lo, c_hi,
            D=D, N_DBLK=n_dblk, INVERSE=inverse, **kw)


def _cfg(scale: float, block_m: int, block_d: int, precision: str, solve: str,
         panel_mib: float, panel_rows: int, dtype: torch.dtype) -> _Cfg:
    """The validated settings of one call (ValueError says what to fix)."""
    if block_m < 16 or block_m > 128 or block_m & (block_m - 1):
        raise ValueError(f"the Triton feedback kernels take chunks (block_m, "
                         f"model.sessa.chunk_size) of 16, 32, 64 or 128 rows, got {block_m}")
    if precision not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"precision must be tf32, tf32x3 or ieee, got {precision!r}")
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    if not panel_mib > 0:
        raise ValueError(f"panel_mib must be positive, got {panel_mib}")
    return _Cfg(scale, block_m, block_d, precision, solve, panel_rows or None, panel_mib, dtype)


def _fwd_op(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, scale: float, block_m: int,
            block_d: int, precision: str, solve: str, panel_mib: float, panel_rows: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Forward solve: (s, lse, r). s (B, T, D) in f's dtype; lse (B, T) float32 in log2 units
    (+inf at t = 0); r (B, T, D) float32. q_b, k_b in f's dtype (float16, bfloat16 or
    float32); gamma any float dtype. ``panel_rows`` 0: W from ``panel_mib``."""
    from sessa_kernels import _fb_kernels as kern

    q, k, g, fc = (x.contiguous() for x in (q_b, k_b, gamma, f))
    cfg = _cfg(scale, block_m, block_d, precision, solve, panel_mib, panel_rows, fc.dtype)
    B, T, DK = q.shape
    D = fc.shape[-1]
    n_chunks = math.ceil(T / block_m)
    n_dblk = math.ceil(D / block_d)
    dev = fc.device
    s = torch.empty_like(fc)
    r = torch.empty(B, T, D, dtype=torch.float32, device=dev)
    lse = torch.empty(B, T, dtype=torch.float32, device=dev)
    if T == 0:
        return s, lse, r
    flags = torch.zeros(B * n_chunks * n_dblk, dtype=torch.int32, device=dev)
    if cfg.solve in PANEL_SOLVES:
        _fwd_panel(q, k, g, fc, s, r, lse, flags, cfg)
    else:
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        kern.fwd_solve[(n_chunks * B * n_dblk,)](
            q, k, g, fc, s, r, lse, flags, counter, T, B, n_chunks, cfg.scale * LOG2E,
            DK=DK, D=D, BK=_bk(DK), N_DBLK=n_dblk, **cfg.kernel_args())
    return s, lse, r


def _fwd_fake(q_b, k_b, gamma, f, scale, block_m, block_d, precision, solve, panel_mib,
              panel_rows):
    B, T, D = f.shape
    return (f.new_empty(B, T, D), f.new_empty(B, T, dtype=torch.float32),
            f.new_empty(B, T, D, dtype=torch.float32))


def _bwd_op(q_b: Tensor, k_b: Tensor, gamma: Tensor, s: Tensor, lse: Tensor, r: Tensor,
            ds: Tensor, scale: float, block_m: int, block_d: int, precision: str, solve: str,
            panel_mib: float, panel_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward from the forward's saved state and ds: (dq_b, dk_b, dgamma, df) in the dtypes
    of q_b, k_b, gamma and s."""
    from sessa_kernels import _fb_kernels as kern

    q, k, g, s, lse, r, ds = (x.contiguous() for x in (q_b, k_b, gamma, s, lse, r, ds))
    cfg = _cfg(scale, block_m, block_d, precision, solve, panel_mib, panel_rows, s.dtype)
    B, T, DK = q.shape
    D = s.shape[-1]
    n_chunks = math.ceil(T / block_m)
    n_dblk = math.ceil(D / block_d)
    dev = s.device
    ds = ds.to(s.dtype)
    u = torch.empty_like(s)
    dg = torch.zeros(B, T, dtype=torch.float32, device=dev)
    if T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dg.to(g.dtype), u
    flags = torch.zeros(B * n_chunks * n_dblk, dtype=torch.int32, device=dev)
    bk = _bk(DK)
    if cfg.solve in PANEL_SOLVES:
        _bwd_panel(q, k, g, ds, u, r, lse, dg, flags, cfg)
    else:
        counter = torch.zeros(1, dtype=torch.int32, device=dev)
        kern.bwd_solve[(n_chunks * B * n_dblk,)](
            q, k, g, ds, u, r, lse, dg, flags, counter, T, B, n_chunks, scale * LOG2E,
            DK=DK, D=D, BK=bk, N_DBLK=n_dblk, **cfg.kernel_args())
    bkd = min(64, max(16, triton_next_pow2(D)))
    dq, dk = _dq_dk(q, k, g, u, s, lse, dg, cfg, BK=min(bk, bkd))
    return dq, dk, dg.to(g.dtype), u


# Rows per dq/dk GEMM on a panel's diagonal part: its rows are multiplied in blocks of this many,
# each against the panel's columns up to its own last row only, so the zero tiles above the
# diagonal cost little ((1 + 2 + ... + n) / n^2 of the full products for n blocks).
GEMM_ROWS = 512


def _dq_dk(q, k, g, u, s, lse, dg, cfg: _Cfg, BK: int) -> tuple[Tensor, Tensor]:
    """dq and dk from the dlogit by panels of W rows (``panel_width``: the ``panel_mib``
    budget, or ``panel_rows``). Per panel of rows r0..hi: the dlogit tiles of its rows against
    all earlier columns (``bwd_dlogit_panel``, parallel) into P; then batched GEMMs in the
    input dtype with float32 accumulation, the dlogit operand rounded to the input dtype (as
    flash attention's backward does; kernels/NOTES.md):
    - the columns before the panel, which every row of it sees: dq[rows] = P[:, :r0] k[:r0],
      dk[:r0] += P[:, :r0]^T q[rows], one GEMM each;
    - the diagonal part by blocks of GEMM_ROWS rows lo..bhi: dq[lo:bhi] += P k[r0:bhi],
      dk[r0:bhi] += P^T q[lo:bhi].
    dq of a later panel (two parts) and dk are summed in float32.
    When one panel holds every row (W = T_pad: short T), dq = P k and dk = P^T q are one GEMM
    each over the whole panel, written in the input dtype: the zero tiles above the diagonal
    cost up to 1.6x the blocked products' FLOPs (a fraction of a millisecond at such T), and
    no float32 dk (B x T x Dk x 4 bytes) is allocated."""
    from sessa_kernels import _fb_kernels as kern

    B, T, DK = q.shape
    D = s.shape[-1]
    bm = cfg.block_m
    t_pad = math.ceil(T / bm) * bm
    W = panel_width(B, T, bm, k.dtype.itemsize, cfg.panel_rows, cfg.panel_mib)
    panel = torch.empty(B, W, t_pad, dtype=k.dtype, device=q.device)

    def dlogit_rows(r0: int, rows: int) -> None:
        kern.bwd_dlogit_panel[(rows // bm, (r0 + rows) // bm, B)](
            q, k, g, u, s, lse, dg, panel, T, r0, W, t_pad, cfg.scale * LOG2E, cfg.scale,
            DK=DK, D=D, BM=bm, BK=BK, num_warps=8 if bm >= 128 else 4)

    if W == t_pad:
        dlogit_rows(0, t_pad)
        p = panel[:, :T, :T]
        return torch.bmm(p, k), torch.bmm(p.transpose(1, 2), q)
    dq = torch.empty_like(q)
    dk = torch.zeros(B, T, DK, dtype=torch.float32, device=q.device)
    for r0 in range(0, T, W):
        rows = min(W, t_pad - r0)
        dlogit_rows(r0, rows)
        hi = min(r0 + rows, T)
        p = panel[:, :hi - r0]
        dq_p = None         # the first panel has no earlier columns: its row blocks are all of dq
        if r0:
            before = p[:, :, :r0]
            dq_p = torch.bmm(before, k[:, :r0]).float()
            dk[:, :r0] += torch.bmm(before.transpose(1, 2), q[:, r0:hi])
        for lo in range(r0, hi, GEMM_ROWS):
            bhi = min(lo + GEMM_ROWS, hi)
            tile = p[:, lo - r0:bhi - r0, r0:bhi]
            part = torch.bmm(tile, k[:, r0:bhi])
            if dq_p is None:
                dq[:, lo:bhi] = part
            else:
                dq_p[:, lo - r0:bhi - r0] += part
            dk[:, r0:bhi] += torch.bmm(tile.transpose(1, 2), q[:, lo:bhi])
        if dq_p is not None:
            dq[:, r0:hi] = dq_p
    return dq, dk.to(k.dtype)


def _bwd_fake(q_b, k_b, gamma, s, lse, r, ds, scale, block_m, block_d, precision, solve,
              panel_mib, panel_rows):
    return (torch.empty_like(q_b, memory_format=torch.contiguous_format),
            torch.empty_like(k_b, memory_format=torch.contiguous_format),
            torch.empty_like(gamma, memory_format=torch.contiguous_format),
            torch.empty_like(s, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    q_b, k_b, gamma, _f, *settings = inputs
    s, lse, r = output
    ctx.save_for_backward(q_b, k_b, gamma, s, lse, r)
    ctx.settings = settings
    ctx.mark_non_differentiable(lse, r)


def _backward(ctx, ds, _dlse, _dr):
    q_b, k_b, gamma, s, lse, r = ctx.saved_tensors
    if ds is None:
        ds = torch.zeros_like(s)
    dq, dk, dg, df = feedback_triton_bwd(q_b, k_b, gamma, s, lse, r, ds, *ctx.settings)
    return (dq, dk, dg, df) + (None,) * len(ctx.settings)


feedback_triton_bwd = define_op(__name__, __file__, "feedback_triton_bwd", _bwd_op,
                                fake=_bwd_fake)
feedback_triton_fwd = define_op(__name__, __file__, "feedback_triton_fwd", _fwd_op,
                                fake=_fwd_fake, backward=_backward,
                                setup_context=_setup_context)


def feedback_triton(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, *,
                    scale: float | None = None, block_m: int | None = None,
                    block_d: int | None = None, precision: str = "tf32",
                    solve: str = "panel", panel_mib: float = 256.0,
                    panel_rows: int | None = None) -> Tensor:
    """Fused feedback solve; returns ``s`` with the shape and dtype of ``f``.

    Differentiable w.r.t. q_b, k_b, gamma and f. Inputs must be CUDA tensors (or CPU tensors
    under ``TRITON_INTERPRET=1``) of dtype float16, bfloat16 or float32 (float64 is computed
    in float32 and cast back). ``block_m``: rows per chunk (16, 32, 64 or 128; default 64,
    the measured setting; ``model.sessa.chunk_size``). ``block_d`` (channels per program) and
    ``precision`` (Triton ``input_precision`` of the float32 in-chunk products: "tf32",
    "tf32x3" or "ieee") are tuning knobs.

    ``solve``: "panel" (default; scores once per super-chunk of W rows into an O(W T)
    scratch of at most ``panel_mib`` MiB, see ``panel_width``), "panel_inverse" (the panel
    solve with the chunks' in-chunk inverses formed in the parallel pass) or "queue" (scores
    recomputed per channel block, no scratch). ``panel_rows`` sets W directly (tests,
    benchmarks).
    """
    check_feedback_inputs(q_b, k_b, gamma, f)
    if not (f.is_cuda or _interpreting()):
        raise ValueError("feedback_triton needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
                         "use sessa_kernels.chunked.feedback_chunked on CPU")
    _, T, DK = q_b.shape
    D = f.shape[-1]
    scale = DK**-0.5 if scale is None else float(scale)
    if T == 0:
        return f.clone()
    bm, bd = _blocks(T, D, block_m, block_d)
    dt = torch.float32 if f.dtype == torch.float64 else f.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {dt}")
    settings = (scale, bm, bd, precision, solve, float(panel_mib), int(panel_rows or 0))
    _cfg(*settings, dt)       # validate before any launch
    s, _, _ = feedback_triton_fwd(q_b.to(dt), k_b.to(dt), gamma, f.to(dt), *settings)
    return s.to(f.dtype)
