"""Mamba-2's chunked SSD as Triton kernels, forward and backward (the GPU training path).

``ssd_triton(x, dt, A, B, C, chunk_size, initial_state)`` has the signature and results of
``sessa_pt.models.mamba2.ssd_chunked`` (the plain PyTorch reference): x (b, T, H, P); dt
(b, T, H) already positive; A (H,); B, C (b, T, G, N), head h reading group h // (H / G);
initial_state (b, H, P, N) or None. Returns y (b, T, H, P) in x's dtype and the final state
(b, H, P, N) in float32. Gradients flow to x, dt, A, B, C and the initial state (the final
state's gradient is honoured too).

Seven kernels (``_ssd_kernels``): forward = chunk states, state passing, chunk scan; backward =
the entering-state gradient of each chunk, the reverse state passing, dx/ddt and dB/dC/d(log
decay). Per-token cumulative decays and the final reductions (dA, the reverse in-chunk cumsum)
are small (b, H, T) tensors done in PyTorch. x, B, C and dy may be strided views (the mixer's
split of in_proj output); no copies of them are made. Saved for backward: the inputs, the
cumulative decays and the chunk-entering states (b, T/L, H, P, N) in float32.

Triton is imported lazily; on CPU the kernels run under the interpreter (TRITON_INTERPRET=1
before the first import of triton; tests only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_chunk_size(chunk_size: int) -> None:
    """The Triton SSD tiles a chunk as one matrix operand: a power of two, 16..256."""
    if chunk_size < 16 or chunk_size > 256 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton SSD needs model.mamba2.chunk_size to be a power of two in "
                         f"16..256, got {chunk_size}; use e.g. 64, or model.mamba2.impl=torch")


def _geometry(x: Tensor, B: Tensor, chunk_size: int) -> dict:
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    L = chunk_size
    c = -(-T // L)
    return {"b": b, "T": T, "H": H, "P": P, "G": G, "N": N, "HG": H // G, "L": L, "c": c,
            "Tp": c * L, "BP": max(16, _next_pow2(P)), "BN": max(16, _next_pow2(N)),
            "PREC": "ieee" if x.dtype == torch.float32 else "tf32"}


def _warps(g: dict) -> int:
    # Small tiles get 4 warps: chunk_dbc_bwd at 8 warps with (64, 32) @ (32, 16) products
    # (head_dim 32, d_state 16) made triton 3.6 address shared memory out of range on sm90
    # (compute-sanitizer: "Out-of-range shared or local address" at its dy @ E product).
    return 4 if g["BN"] * g["BP"] <= 64 * 64 else 8


# The group kernels loop over heads with several (L, P) / (P, N) tiles per iteration; two
# pipeline stages (num_stages=2) keep their shared-memory buffers well inside Hopper's 228 KB
# (three stages of the backward's tiles would come near it at d_state 128).


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk_size):
        from sessa_kernels import _ssd_kernels as kern

        g = _geometry(x, B, chunk_size)
        b, T, H, P, G, N, L, c, Tp = (g[k] for k in ("b", "T", "H", "P", "G", "N", "L", "c",
                                                     "Tp"))
        dt_p = F.pad(dt.float(), (0, 0, 0, Tp - T)).transpose(1, 2).contiguous()   # (b, H, Tp)
        Af = A.float()
        acum = (dt_p * Af[:, None]).view(b, H, c, L).cumsum(-1).view(b, H, Tp)
        states = x.new_empty((b, c, H, P, N), dtype=torch.float32)
        sx, sb = x.stride(), B.stride()
        if C.stride() != sb:   # the kernels address B and C with one set of strides
            B, C = B.contiguous(), C.contiguous()
            sb = B.stride()
        common = {"L": L, "BP": g["BP"], "BN": g["BN"], "PREC": g["PREC"]}
        with torch.cuda.device(x.device) if x.is_cuda else _null():
            kern.chunk_state_fwd[(b * H, c)](
                x, dt_p, acum, B, states, T, Tp, H, G, g["HG"], P, N, *sx, *sb, **common)
            PN = P * N
            block = min(1024, _next_pow2(PN))
            final = x.new_empty((b, H, P, N), dtype=torch.float32)
            init = None if initial_state is None else initial_state.float().contiguous()
            kern.state_pass_fwd[(b * H, -(-PN // block))](
                states, acum, states if init is None else init, final, Tp, H, PN, c,
                L=L, BLOCK=block, HAS_INIT=init is not None)
            y = x.new_empty((b, T, H, P))
            kern.chunk_scan_fwd[(b * G, c)](
                x, dt_p, acum, B, C, states, y, T, Tp, H, G, g["HG"], P, N, *sx, *sb,
                *y.stride(), num_warps=_warps(g), num_stages=2, **common)
        ctx.save_for_backward(x, dt_p, Af, B, C, acum, states)
        ctx.geom, ctx.has_init = g, initial_state is not None
        ctx.dtypes = (dt.dtype, A.dtype, None if initial_state is None else initial_state.dtype)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from sessa_kernels import _ssd_kernels as kern

        x, dt_p, Af, B, C, acum, ent = ctx.saved_tensors
        g = ctx.geom
        b, T, H, P, G, N, L, c, Tp = (g[k] for k in ("b", "T", "H", "P", "G", "N", "L", "c",
                                                     "Tp"))
        if dy is None:
            dy = x.new_zeros(x.shape)
        sx, sb, sy = x.stride(), B.stride(), dy.stride()
        common = {"L": L, "BP": g["BP"], "BN": g["BN"], "PREC": g["PREC"]}
        PN = P * N
        block = min(1024, _next_pow2(PN))
        n_blocks = -(-PN // block)
        with torch.cuda.device(x.device) if x.is_cuda else _null():
            d = x.new_empty((b, c, H, P, N), dtype=torch.float32)
            kern.chunk_dstate_bwd[(b * H, c)](
                dy, acum, C, d, T, Tp, H, G, g["HG"], P, N, *sy, *sb, **common)
            dinit = x.new_empty((b, H, P, N), dtype=torch.float32)
            dg = x.new_empty((b * H, n_blocks, c), dtype=torch.float32)
            dfin = None if dfinal is None else dfinal.float().contiguous()
            kern.state_pass_bwd[(b * H, n_blocks)](
                d, ent, acum, d if dfin is None else dfin, dinit, dg, Tp, H, PN, c, n_blocks,
                L=L, BLOCK=block, HAS_DFINAL=dfin is not None)
            dx = x.new_empty(x.shape)
            ddt_x = x.new_empty((b, H, Tp), dtype=torch.float32)
            kern.chunk_dx_bwd[(b * G, c)](
                x, dt_p, acum, B, C, dy, d, dx, ddt_x, T, Tp, H, G, g["HG"], P, N,
                *sx, *sb, *sy, *dx.stride(), num_warps=_warps(g), num_stages=2, **common)
            dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
            dacum = x.new_empty((b, H, Tp), dtype=torch.float32)
            kern.chunk_dbc_bwd[(b * G, c)](
                x, dt_p, acum, B, C, dy, ent, d, dB, dC, dacum, T, Tp, H, G, g["HG"], P, N,
                *sx, *sb, *sy, *dB.stride(), num_warps=_warps(g), num_stages=2, **common)
        # the chunk decay exp(alast) also scales the state passed on (state_pass_bwd's dg)
        dacum = dacum.view(b, H, c, L)
        alast = acum.view(b, H, c, L)[..., -1]
        dacum[..., -1] += alast.exp() * dg.view(b, H, n_blocks, c).sum(2)
        da = dacum.flip(-1).cumsum(-1).flip(-1).reshape(b, H, Tp)    # acum = in-chunk cumsum(a)
        ddt = ddt_x + da * Af[:, None]
        dA = (da * dt_p).sum(dim=(0, 2))
        dt_dtype, A_dtype, init_dtype = ctx.dtypes
        ddt = ddt[:, :, :T].transpose(1, 2).to(dt_dtype)
        return (dx, ddt, dA.to(A_dtype), dB, dC,
                dinit.to(init_dtype) if ctx.has_init else None, None)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked SSD in Triton; see the module docstring."""
    from sessa_pt.models.mamba2 import _check_ssd_inputs

    _check_ssd_inputs(x, dt, A, B, C, initial_state)
    check_chunk_size(chunk_size)
    if x.dtype == torch.float64:
        raise ValueError("the Triton SSD computes in float32; use ssd_chunked for float64")
    if x.shape[1] == 0:
        b, _, H, P = x.shape
        N = B.shape[-1]
        init = (x.new_zeros((b, H, P, N), dtype=torch.float32) if initial_state is None
                else initial_state.float())
        return x.new_zeros(x.shape), init
    # the kernels' products take both operands in x's dtype
    B, C = B.to(x.dtype), C.to(x.dtype)
    return _SSD.apply(x, dt, A, B, C, initial_state, chunk_size)
