"""Mamba-2's chunked SSD as Triton kernels, forward and backward (the GPU training path).

``ssd_triton(x, dt, A, B, C, chunk_size, initial_state)`` has the signature and results of
``sessa_pt.models.mamba2.ssd_chunked`` (the plain PyTorch reference): x (b, T, H, P); dt
(b, T, H) already positive; A (H,); B, C (b, T, G, N), head h reading group h // (H / G);
initial_state (b, H, P, N) or None. Returns y (b, T, H, P) in x's dtype and the final state
(b, H, P, N) in float32. Gradients flow to x, dt, A, B, C and the initial state (the final
state's gradient is honoured too).

Seven kernels (``_ssd_kernels``): forward = chunk states, state passing, chunk scan; backward =
the entering-state gradient of each chunk, the reverse state passing, dx/ddt and dB/dC/d(log
decay). They run as two PyTorch custom operators, ``sessa::ssd_triton_fwd`` and
``sessa::ssd_triton_bwd`` (``oplib``; fake implementations for shapes, autograd registered),
so torch.compile keeps a Mamba2 block in one graph and treats only the kernels as opaque. The
per-token decays (dt padded to whole chunks, the in-chunk cumulative log-decay) are small
(b, H, T) tensors made in PyTorch before the forward operator: compiled, they fuse with their
neighbours, and autograd carries the operator's gradient of the decays back to dt and A.
x, B, C and dy may be strided views (the mixer's split of in_proj output); no copies of them
are made. Saved for backward: the inputs, the decays and the chunk-entering states
(b, T/L, H, P, N) in float32.

Triton is imported lazily; on CPU the kernels run under the interpreter (TRITON_INTERPRET=1
before the first import of triton; tests only).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from sessa_kernels.oplib import define_op


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
            "PREC": "ieee" if x.dtype == torch.float32 else "tf32",
            "PN": P * N, "BLOCK": min(1024, _next_pow2(P * N))}   # the state-passing blocks


def _one_stride(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """B and C with equal strides: the kernels address both with one set."""
    if C.stride() != B.stride():
        B, C = B.contiguous(), C.contiguous()
    return B, C


def _tiles(g: dict) -> dict:
    """The constexpr tile sizes every chunk kernel takes."""
    return {"L": g["L"], "BP": g["BP"], "BN": g["BN"], "PREC": g["PREC"]}


def _warps(g: dict) -> int:
    # Small tiles get 4 warps: chunk_dbc_bwd at 8 warps with (64, 32) @ (32, 16) products
    # (head_dim 32, d_state 16) made triton 3.6 address shared memory out of range on sm90
    # (compute-sanitizer: "Out-of-range shared or local address" at its dy @ E product).
    return 4 if g["BN"] * g["BP"] <= 64 * 64 else 8


# The group kernels loop over heads with several (L, P) / (P, N) tiles per iteration; two
# pipeline stages (num_stages=2) keep their shared-memory buffers well inside Hopper's 228 KB
# (three stages of the backward's tiles would come near it at d_state 128).


def _fwd_op(x: Tensor, dt_p: Tensor, acum: Tensor, B: Tensor, C: Tensor,
            initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """y (b, T, H, P) in x's dtype, the final state and the chunk-entering states (b, c, H, P,
    N), both float32, from the padded dt and in-chunk cumulative log-decays (b, H, Tp)."""
    from sessa_kernels import _ssd_kernels as kern

    g = _geometry(x, B, chunk_size)
    b, T, H, P, G, N, L, c, Tp = (g[k] for k in ("b", "T", "H", "P", "G", "N", "L", "c", "Tp"))
    PN, block = g["PN"], g["BLOCK"]
    B, C = _one_stride(B, C)
    sx, sb, common = x.stride(), B.stride(), _tiles(g)
    states = x.new_empty((b, c, H, P, N), dtype=torch.float32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kern.chunk_state_fwd[(b * H, c)](
            x, dt_p, acum, B, states, T, Tp, H, G, g["HG"], P, N, *sx, *sb, **common)
        final = x.new_empty((b, H, P, N), dtype=torch.float32)
        init = None if initial_state is None else initial_state.float().contiguous()
        kern.state_pass_fwd[(b * H, -(-PN // block))](
            states, acum, states if init is None else init, final, Tp, H, PN, c,
            L=L, BLOCK=block, HAS_INIT=init is not None)
        y = x.new_empty((b, T, H, P))
        kern.chunk_scan_fwd[(b * G, c)](
            x, dt_p, acum, B, C, states, y, T, Tp, H, G, g["HG"], P, N, *sx, *sb,
            *y.stride(), num_warps=_warps(g), num_stages=2, **common)
    return y, final, states


def _fwd_fake(x, dt_p, acum, B, C, initial_state, chunk_size):
    b, T, H, P = x.shape
    N, c = B.shape[-1], acum.shape[-1] // chunk_size
    return (x.new_empty((b, T, H, P)), x.new_empty((b, H, P, N), dtype=torch.float32),
            x.new_empty((b, c, H, P, N), dtype=torch.float32))


def _bwd_op(x: Tensor, dt_p: Tensor, acum: Tensor, B: Tensor, C: Tensor, states: Tensor,
            dy: Tensor, dfinal: Tensor | None, chunk_size: int
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d dt_p, d acum, dB, dC, d initial state) from the forward's inputs and states."""
    from sessa_kernels import _ssd_kernels as kern

    g = _geometry(x, B, chunk_size)
    b, T, H, P, G, N, L, c, Tp = (g[k] for k in ("b", "T", "H", "P", "G", "N", "L", "c", "Tp"))
    PN, block = g["PN"], g["BLOCK"]
    n_blocks = -(-PN // block)
    B, C = _one_stride(B, C)
    sx, sb, sy, common = x.stride(), B.stride(), dy.stride(), _tiles(g)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        d = x.new_empty((b, c, H, P, N), dtype=torch.float32)
        kern.chunk_dstate_bwd[(b * H, c)](
            dy, acum, C, d, T, Tp, H, G, g["HG"], P, N, *sy, *sb, **common)
        dinit = x.new_empty((b, H, P, N), dtype=torch.float32)
        dg = x.new_empty((b * H, n_blocks, c), dtype=torch.float32)
        dfin = None if dfinal is None else dfinal.float().contiguous()
        kern.state_pass_bwd[(b * H, n_blocks)](
            d, states, acum, d if dfin is None else dfin, dinit, dg, Tp, H, PN, c, n_blocks,
            L=L, BLOCK=block, HAS_DFINAL=dfin is not None)
        dx = x.new_empty(x.shape)
        ddt_p = x.new_empty((b, H, Tp), dtype=torch.float32)
        kern.chunk_dx_bwd[(b * G, c)](
            x, dt_p, acum, B, C, dy, d, dx, ddt_p, T, Tp, H, G, g["HG"], P, N,
            *sx, *sb, *sy, *dx.stride(), num_warps=_warps(g), num_stages=2, **common)
        dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
        dacum = x.new_empty((b, H, Tp), dtype=torch.float32)
        kern.chunk_dbc_bwd[(b * G, c)](
            x, dt_p, acum, B, C, dy, states, d, dB, dC, dacum, T, Tp, H, G, g["HG"], P, N,
            *sx, *sb, *sy, *dB.stride(), num_warps=_warps(g), num_stages=2, **common)
    # the chunk decay exp(alast) also scales the state passed on (state_pass_bwd's dg); alast
    # is acum at each chunk's last position
    last = dacum.view(b, H, c, L)[..., -1]
    last += acum.view(b, H, c, L)[..., -1].exp() * dg.view(b, H, n_blocks, c).sum(2)
    return dx, ddt_p, dacum, dB, dC, dinit


def _bwd_fake(x, dt_p, acum, B, C, states, dy, dfinal, chunk_size):
    b, _, H, P = x.shape
    return (x.new_empty(x.shape), acum.new_empty(acum.shape), acum.new_empty(acum.shape),
            B.new_empty(B.shape), C.new_empty(C.shape),
            x.new_empty((b, H, P, B.shape[-1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    x, dt_p, acum, B, C, initial_state, chunk_size = inputs
    ctx.save_for_backward(x, dt_p, acum, B, C, output[2])
    ctx.chunk_size, ctx.has_init = chunk_size, initial_state is not None
    ctx.init_dtype = None if initial_state is None else initial_state.dtype
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dfinal, _dstates):
    x, dt_p, acum, B, C, states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt_p, dacum, dB, dC, dinit = ssd_triton_bwd(x, dt_p, acum, B, C, states, dy, dfinal,
                                                     ctx.chunk_size)
    return (dx, ddt_p, dacum, dB, dC, dinit.to(ctx.init_dtype) if ctx.has_init else None, None)


ssd_triton_bwd = define_op(__name__, __file__, "ssd_triton_bwd", _bwd_op, fake=_bwd_fake)
ssd_triton_fwd = define_op(__name__, __file__, "ssd_triton_fwd", _fwd_op, fake=_fwd_fake,
                           backward=_backward, setup_context=_setup_context)


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked SSD in Triton; see the module docstring."""
    from sessa_pt.models.mamba2 import _check_ssd_inputs

    _check_ssd_inputs(x, dt, A, B, C, initial_state)
    check_chunk_size(chunk_size)
    if x.dtype == torch.float64:
        raise ValueError("the Triton SSD computes in float32; use ssd_chunked for float64")
    b, T, H, P = x.shape
    if T == 0:
        N = B.shape[-1]
        init = (x.new_zeros((b, H, P, N), dtype=torch.float32) if initial_state is None
                else initial_state.float())
        return x.new_zeros(x.shape), init
    # In PyTorch, so that torch.compile fuses them and autograd carries the decays' gradient
    # to dt and A: dt padded to whole chunks and the in-chunk cumulative log-decay, (b, H, Tp).
    L = chunk_size
    c = -(-T // L)
    dt_p = F.pad(dt.float(), (0, 0, 0, c * L - T)).transpose(1, 2).contiguous()
    acum = (dt_p * A.float()[:, None]).view(b, H, c, L).cumsum(-1).view(b, H, c * L)
    # the kernels' products take both operands in x's dtype
    y, final, _ = ssd_triton_fwd(x, dt_p, acum, B.to(x.dtype), C.to(x.dtype), initial_state,
                                 chunk_size)
    return y, final
