"""The Sessa feedback solve as fused Triton kernels, forward and backward.

``feedback_triton(q_b, k_b, gamma, f)`` solves ``(I - B_fb) s = f`` with
``B_fb[t, j] = gamma_t softmax_{j<t}(scale q_b[t] . k_b[j])`` like
``sessa_pt.models.feedback.feedback_dense``, without a T x T tensor: the routing scores, the
normaliser over the strict past, gamma and the blocked solve are one kernel
(``_fb_kernels.fwd_solve``); the backward is the adjoint solve in reverse time (which also
gives dgamma) and one softmax-backward kernel launched for dq and for dk. Operands of the
matrix products are in the input dtype (bf16 in training), accumulation and the in-chunk
solves in float32. Saved for backward: q_b, k_b, gamma, s and, in float32, the row log-sum-exp
(B, T) and r = alpha @ s (B, T, D): O(T D) memory. r and dgamma are computed from s and u as
stored (rounded to the input dtype), the values the dq/dk kernel reads (``from_stored``,
``SESSA_FROM_STORED``, default on).

Two variants of the forward and adjoint solves, with the same outputs and gradients:
"panel" (default; ``_fb_panel_kernels``: the scores once per super-chunk of W rows into a
scratch panel of B x W x T_pad elements, O(W T) and at most ``SESSA_PANEL_MIB`` MiB, see
``panel_width``; never T x T unless that fits the budget; tiles in the input dtype or, with
``SESSA_PANEL_SCRATCH=fp32``, in float32) and "queue" (``SESSA_SOLVE=queue`` or
``solve="queue"``; ``_fb_kernels``: the score tile recomputed by every channel-block program,
no scratch). On the H200 the panel layer takes 0.73-0.98x the queue layer's time
(BENCHMARKS.md).

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

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
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
                panel_rows: int | None = None) -> int:
    """Rows (forward) / columns (adjoint) W of one super-chunk of the panel solve: a multiple
    of block_m, at most T rounded up to block_m. Default: the largest W whose scratch,
    B * W * T_pad panel elements plus 8 bytes of tile statistics per row and column chunk,
    fits ``SESSA_PANEL_MIB`` MiB (default 256), and at least block_m."""
    t_pad = math.ceil(T / block_m) * block_m
    if panel_rows is None:
        budget = float(os.environ.get("SESSA_PANEL_MIB", "256")) * 2**20
        per_row = B * t_pad * (elem_bytes + 8 / block_m)
        panel_rows = int(budget // per_row)
    w = max(block_m, panel_rows // block_m * block_m)
    return min(w, t_pad)


class _Cfg(NamedTuple):
    """Settings of one feedback_triton call, shared by its forward and backward."""
    scale: float
    block_m: int
    block_d: int
    prec: str                      # input_precision of the float32 in-chunk products
    solve: str                     # "queue" or "panel"
    panel_rows: int | None         # W of the panel solves (None: from SESSA_PANEL_MIB)
    panel_dtype: torch.dtype       # element type of the off-diagonal panel scratch
    from_stored: bool              # r and dgamma from the stored (rounded) s and u

    def kernel_args(self) -> dict:
        bm = self.block_m
        return {"BM": bm, "BD": self.block_d, "LOG2_BM": int(math.log2(bm)), "PREC": self.prec,
                "FROM_STORED": self.from_stored,
                "num_warps": 8 if self.block_d >= 256 else 4}


def _panel_geometry(q, values, cfg: _Cfg):
    """Sizes shared by both panel solves: (B, T, Dk, D, chunks, padded T, channel blocks, W,
    chunks per super-chunk)."""
    B, T, DK = q.shape
    D = values.shape[-1]
    bm = cfg.block_m
    nc = math.ceil(T / bm)
    W = panel_width(B, T, bm, cfg.panel_dtype.itemsize, cfg.panel_rows)
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
    counters = torch.zeros(math.ceil(nc / nw), dtype=torch.int32, device=dev)
    for j, r0 in enumerate(range(0, nc, nw)):
        n_local = min(nw, nc - r0)
        pk.fwd_panel_scores[(n_local, r0 + n_local, B)](
            q, k, panel, diag, stm, stl, T, W, t_pad, nc, r0, cfg.scale * LOG2E,
            DK=DK, BM=bm, BK=_bk(DK), num_warps=4)
        pk.fwd_panel_lse[(n_local, B)](stm, stl, lse, T, W, nc, r0, BM=bm, BC=64, num_warps=4)
        pk.fwd_panel_solve[(n_local * B * n_dblk,)](
            g, f, s, r, lse, panel, diag, stm, flags, counters[j:], T, B, W, t_pad, nc, r0,
            n_local, D=D, N_DBLK=n_dblk, **cfg.kernel_args())


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
    counters = torch.zeros(math.ceil(nc / nw), dtype=torch.int32, device=dev)
    for j, c_hi in enumerate(range(nc, 0, -nw)):
        c_lo = max(0, c_hi - nw)
        pk.bwd_panel_scores[(nc - c_lo, c_hi - c_lo, B)](
            q, k, lse, panel, diag, T, W, t_pad, c_lo, cfg.scale * LOG2E,
            DK=DK, BM=bm, BK=_bk(DK), num_warps=4)
        pk.bwd_panel_solve[((c_hi - c_lo) * B * n_dblk,)](
            g, ds, u, r, dg, panel, diag, flags, counters[j:], T, B, W, t_pad, nc, c_lo, c_hi,
            D=D, N_DBLK=n_dblk, **cfg.kernel_args())


class _FeedbackTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, cfg: _Cfg) -> Tensor:
        from sessa_kernels import _fb_kernels as kern

        q, k, g, fc = (x.contiguous() for x in (q_b, k_b, gamma, f))
        B, T, DK = q.shape
        D = f.shape[-1]
        block_m = cfg.block_m
        n_chunks = math.ceil(T / block_m)
        n_dblk = math.ceil(D / cfg.block_d)
        dev = f.device
        s = torch.empty_like(fc)
        r = torch.empty(B, T, D, dtype=torch.float32, device=dev)
        lse = torch.empty(B, T, dtype=torch.float32, device=dev)
        flags = torch.zeros(B * n_chunks * n_dblk, dtype=torch.int32, device=dev)
        if cfg.solve == "panel":
            _fwd_panel(q, k, g, fc, s, r, lse, flags, cfg)
        else:
            counter = torch.zeros(1, dtype=torch.int32, device=dev)
            kern.fwd_solve[(n_chunks * B * n_dblk,)](
                q, k, g, fc, s, r, lse, flags, counter, T, B, n_chunks, cfg.scale * LOG2E,
                DK=DK, D=D, BK=_bk(DK), N_DBLK=n_dblk, **cfg.kernel_args())
        ctx.save_for_backward(q, k, g, s, lse, r)
        ctx.cfg = cfg
        return s

    @staticmethod
    def backward(ctx, ds: Tensor):
        from sessa_kernels import _fb_kernels as kern

        q, k, g, s, lse, r = ctx.saved_tensors
        cfg = ctx.cfg
        scale, block_m = cfg.scale, cfg.block_m
        B, T, DK = q.shape
        D = s.shape[-1]
        n_chunks = math.ceil(T / block_m)
        n_dblk = math.ceil(D / cfg.block_d)
        dev = s.device
        ds = ds.contiguous()
        u = torch.empty_like(s)
        dg = torch.zeros(B, T, dtype=torch.float32, device=dev)
        flags = torch.zeros(B * n_chunks * n_dblk, dtype=torch.int32, device=dev)
        bk = _bk(DK)
        if cfg.solve == "panel":
            _bwd_panel(q, k, g, ds, u, r, lse, dg, flags, cfg)
        else:
            counter = torch.zeros(1, dtype=torch.int32, device=dev)
            kern.bwd_solve[(n_chunks * B * n_dblk,)](
                q, k, g, ds, u, r, lse, dg, flags, counter, T, B, n_chunks, scale * LOG2E,
                DK=DK, D=D, BK=bk, N_DBLK=n_dblk, **cfg.kernel_args())
        bkd = min(64, max(16, triton_next_pow2(D)))
        if os.environ.get("SESSA_DQDK", "pairs") == "pairs":
            dq = torch.zeros(B, T, DK, dtype=torch.float32, device=dev)
            dk = torch.zeros(B, T, DK, dtype=torch.float32, device=dev)
            bko = min(64, max(16, triton_next_pow2(DK)))
            kern.bwd_dqdk_pairs[(n_chunks, n_chunks, B)](
                q, k, g, u, s, lse, dg, dq, dk, T, scale * LOG2E, scale,
                DK=DK, D=D, BM=block_m, BK=min(bk, bkd), BKO=bko, num_warps=4)
        else:
            bko = min(128, max(16, triton_next_pow2(DK)))
            grid = (n_chunks, math.ceil(DK / bko), B)
            dq = torch.empty(B, T, DK, dtype=torch.float32, device=dev)
            dk = torch.empty(B, T, DK, dtype=torch.float32, device=dev)
            for out, for_dq in ((dq, True), (dk, False)):
                kern.bwd_dqdk[grid](q, k, g, u, s, lse, dg, out, T, n_chunks, scale * LOG2E,
                                    scale, DK=DK, D=D, BM=block_m, BK=min(bk, bkd), BKO=bko,
                                    FOR_DQ=for_dq, num_warps=4)
        return dq.to(q.dtype), dk.to(k.dtype), dg.to(g.dtype), u, None


def feedback_triton(q_b: Tensor, k_b: Tensor, gamma: Tensor, f: Tensor, *,
                    scale: float | None = None, block_m: int | None = None,
                    block_d: int | None = None, precision: str = "tf32",
                    solve: str | None = None, panel_rows: int | None = None,
                    panel_scratch: str | None = None, from_stored: bool | None = None
                    ) -> Tensor:
    """Fused feedback solve; returns ``s`` with the shape and dtype of ``f``.

    Differentiable w.r.t. q_b, k_b, gamma and f. Inputs must be CUDA tensors (or CPU tensors
    under ``TRITON_INTERPRET=1``) of dtype float16, bfloat16 or float32 (float64 is computed
    in float32 and cast back). ``block_m`` (rows per chunk, a power of two >= 16),
    ``block_d`` (channels per program) and ``precision`` (Triton ``input_precision`` of the
    float32 in-chunk products: "tf32", "tf32x3" or "ieee") are tuning knobs.

    ``solve`` picks the forward / adjoint solve kernels: "panel" (default; scores once per
    super-chunk of ``panel_rows`` rows into an O(W T) scratch, see ``panel_width``) or "queue"
    (scores recomputed per channel block, no scratch); None reads ``SESSA_SOLVE`` (default
    "panel").
    ``panel_scratch``: element type of the panel's off-diagonal tiles, "input" (the input
    dtype, bf16 in training) or "fp32" (then the past products run in tf32 on float32 tiles;
    twice the bytes, so W halves for the same ``SESSA_PANEL_MIB``); None reads
    ``SESSA_PANEL_SCRATCH`` (default "input", see kernels/NOTES.md).
    ``from_stored``: r = alpha @ s (forward) and dgamma = <u, r> (adjoint) from s and u as
    stored in the input dtype, the values the dq/dk kernel reads, rather than from the float32
    solutions before rounding (keeps the dlogit rows consistent: about 3x smaller dq/dk error
    with bf16 under sharp routing); None reads ``SESSA_FROM_STORED`` (default 1).
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
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {bm}")
    if precision not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"precision must be tf32, tf32x3 or ieee, got {precision!r}")
    solve = solve or os.environ.get("SESSA_SOLVE", "panel")
    if solve not in ("queue", "panel"):
        raise ValueError(f"solve (or SESSA_SOLVE) must be queue or panel, got {solve!r}")
    panel_scratch = panel_scratch or os.environ.get("SESSA_PANEL_SCRATCH", "input")
    if panel_scratch not in ("input", "fp32"):
        raise ValueError("panel_scratch (or SESSA_PANEL_SCRATCH) must be input or fp32, got "
                         f"{panel_scratch!r}")
    if from_stored is None:
        from_stored = os.environ.get("SESSA_FROM_STORED", "1") != "0"
    dt = torch.float32 if f.dtype == torch.float64 else f.dtype
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {dt}")
    cfg = _Cfg(scale, bm, bd, precision, solve, panel_rows,
               torch.float32 if panel_scratch == "fp32" else dt, bool(from_stored))
    if f.dtype == torch.float64:
        args = [x.float() for x in (q_b, k_b, gamma, f)]
        return _FeedbackTriton.apply(*args, cfg).double()
    return _FeedbackTriton.apply(q_b.to(dt), k_b.to(dt), gamma, f, cfg)
