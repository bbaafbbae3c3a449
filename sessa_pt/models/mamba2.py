"""The Mamba-2 sequence mixer (Dao & Gu, 2024) in plain PyTorch, the SSM baseline.

A mixer maps ``a`` (B, T, D) -> (B, T, D) and drops into the paper's gated block in place of the
Sessa mixer:

    [z, x, B, C, dt_raw] = in_proj(a)                        d_inner, d_inner, G*N, G*N, H
    [x, B, C] = SiLU(causal depthwise conv1d([x, B, C]))     kernel d_conv, with bias
    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)        one scalar decay per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T               per head: h (head_dim, N)
    y_t = h_t C_t + D_skip x_t
    out = out_proj(RMSNorm(y * SiLU(z)))                     gated RMSNorm, grouped by G

The SSM lives in two standalone functions with one signature, so they can be compared directly:

* :func:`ssd_chunked` - the chunked SSD algorithm: a quadratic (attention-like) form inside each
  chunk with a segment-sum decay mask, and a recurrence over chunk states between chunks;
  ``T`` not divisible by the chunk size is handled by zero padding (dt = 0 there, which neither
  decays nor feeds the state).
* :func:`ssd_sequential` - the token-by-token scan, the readable reference.

Both run in float32 (float64 if the inputs are float64) whatever the activation dtype, with
autocast off, and return ``y`` in the dtype of ``x`` and the final state in the accumulation
dtype. Decoding keeps the conv's last ``d_conv - 1`` inputs and the SSM state in a
:class:`Mamba2Cache`; a forward with a cache continues from it (prefill = forward with an empty
cache, decode = a forward with T == 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from sessa_kernels.precision import accumulation_dtype
from torch import Tensor, nn

from sessa_pt.models.config import Mamba2Conv, Mamba2Impl

MAMBA2_IMPLS: tuple[str, ...] = get_args(Mamba2Impl)
MAMBA2_CONV_IMPLS: tuple[str, ...] = get_args(Mamba2Conv)


@dataclass
class Mamba2Cache:
    """Decoding state. Both tensors are sized on first use.

    ``conv_state``: the last ``d_conv - 1`` inputs of the conv, (B, d_inner + 2 G N, d_conv - 1).
    ``ssm_state``: h after the last seen token, (B, H, head_dim, d_state), float32/float64.
    ``length``: tokens seen so far.
    """

    conv_state: Tensor | None = None
    ssm_state: Tensor | None = None
    length: int = 0


def _check_ssd_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      initial_state: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, T, heads, head_dim), got shape {tuple(x.shape)}")
    b, T, H, P = x.shape
    if dt.shape != (b, T, H):
        raise ValueError(f"dt must be {(b, T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be ({H},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, T) or B.shape != C.shape:
        raise ValueError(f"B and C must both be (batch, T, groups, d_state) with batch, T = "
                         f"{b}, {T}; got {tuple(B.shape)} and {tuple(C.shape)}")
    G, N = B.shape[2:]
    if H % G:
        raise ValueError(f"heads={H} must be divisible by groups={G}")
    if initial_state is not None and initial_state.shape != (b, H, P, N):
        raise ValueError(f"initial_state must be {(b, H, P, N)}, got "
                         f"{tuple(initial_state.shape)}")


def segsum(a: Tensor) -> Tensor:
    """Segment sums over the last dim: ``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for
    ``j <= i`` (0 on the diagonal) and ``-inf`` for ``j > i``, shape (..., L, L).

    Each entry sums its own terms (a cumsum down a strictly-lower-triangular copy of ``a``)
    instead of differencing one long cumsum, so there is no cancellation, and the upper triangle
    is -inf *before* any exp: with ``a <= 0``, ``exp(segsum(a))`` never sees a positive exponent.
    """
    L = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, L)                   # x[..., i, j] = a[..., i]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    x = x.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)    # keep i > j
    out = torch.cumsum(x, dim=-2)                             # sum_{j < k <= i} a[k]
    return out.masked_fill(~torch.tril(ones, diagonal=0), float("-inf"))


def ssd_sequential(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSM as a token-by-token scan (the reference for :func:`ssd_chunked`).

    x (b, T, H, P); dt (b, T, H), already positive; A (H,); B, C (b, T, G, N) with head ``h``
    reading group ``h // (H // G)``; initial_state (b, H, P, N) or None (zeros).
    ``chunk_size`` is ignored (it is there so both functions share one signature).

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t

    Returns y (b, T, H, P) in x's dtype and the final state (b, H, P, N) in float32/float64.
    """
    del chunk_size
    _check_ssd_inputs(x, dt, A, B, C, initial_state)
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    acc = accumulation_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xa, dta = x.to(acc), dt.to(acc)
        Bh = B.to(acc).repeat_interleave(H // G, dim=2)           # (b, T, H, N)
        Ch = C.to(acc).repeat_interleave(H // G, dim=2)
        decay = torch.exp(dta * A.to(acc))                        # (b, T, H)
        h = (x.new_zeros((b, H, P, N), dtype=acc) if initial_state is None
             else initial_state.to(acc))
        ys = []
        for t in range(T):
            u = (dta[:, t, :, None] * xa[:, t])[..., None] * Bh[:, t, :, None, :]
            h = decay[:, t, :, None, None] * h + u
            ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
        y = torch.stack(ys, dim=1) if ys else xa.new_zeros((b, 0, H, P))
    return y.to(x.dtype), h


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSM by the chunked SSD algorithm; same arguments and results as
    :func:`ssd_sequential`.

    With chunk length ``L = min(chunk_size, T)``, ``c = ceil(T / L)`` chunks and per-token
    log-decays ``a = dt A`` (cumulated within a chunk as ``a_cum``):

    1. intra-chunk: ``y[l] = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s``;
    2. chunk states: ``S_k = sum_s exp(a_cum[-1] - a_cum[s]) dt_s x_s B_s^T`` (state at the end
       of chunk k from its own inputs);
    3. state passing: the state entering each chunk, ``sum_{k' <= k} (decay of the chunks in
       between) S_{k'}``, with the initial state as chunk -1, as one (c+1) x (c+1) einsum;
    4. state -> output: ``y[l] += exp(a_cum[l]) C_l h_entering``.

    The group structure is kept (the C.B scores are computed once per group, not per head).
    """
    _check_ssd_inputs(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    hg = H // G
    acc = accumulation_dtype(x.dtype)
    L = max(1, min(chunk_size, T))
    c = -(-T // L)
    pad = c * L - T
    with torch.autocast(x.device.type, enabled=False):
        xa, dta, Ba, Ca = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
        if pad:   # dt = 0 and x = B = C = 0: no decay, no input, outputs dropped below
            xa = F.pad(xa, (0, 0, 0, 0, 0, pad))
            dta = F.pad(dta, (0, 0, 0, pad))
            Ba = F.pad(Ba, (0, 0, 0, 0, 0, pad))
            Ca = F.pad(Ca, (0, 0, 0, 0, 0, pad))
        xa = xa.view(b, c, L, G, hg, P)
        dta = dta.view(b, c, L, G, hg)
        Ba, Ca = Ba.view(b, c, L, G, N), Ca.view(b, c, L, G, N)
        a = (dta * A.to(acc).view(G, hg)).permute(0, 1, 3, 4, 2)    # (b, c, G, hg, L)
        a_cum = torch.cumsum(a, dim=-1)
        xdt = xa * dta.unsqueeze(-1)                                 # (b, c, L, G, hg, P)

        # 1. intra-chunk quadratic form (the diagonal blocks)
        scores = torch.einsum("bclgn,bcsgn->bcgls", Ca, Ba)          # (b, c, G, L, L)
        M = scores.unsqueeze(3) * torch.exp(segsum(a))               # (b, c, G, hg, L, L)
        y = torch.einsum("bcghls,bcsghp->bclghp", M, xdt)

        # 2. each chunk's own contribution to the state at its end
        to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 1, 4, 2, 3)   # (b, c, L, G, hg)
        states = torch.einsum("bclgn,bclghp->bcghpn", Ba, xdt * to_end.unsqueeze(-1))

        # 3. pass states across chunks: entering[k] = sum_{k' <= k} decay(k'+1..k) states[k']
        init = (xa.new_zeros((b, 1, H, P, N)) if initial_state is None
                else initial_state.to(acc).unsqueeze(1))
        states = torch.cat([init, states.reshape(b, c, H, P, N)], dim=1)       # (b, c+1, ...)
        chunk_a = F.pad(a_cum[..., -1].reshape(b, c, H).transpose(1, 2), (1, 0))  # (b, H, c+1)
        states = torch.einsum("bhzk,bkhpn->bzhpn", torch.exp(segsum(chunk_a)), states)
        entering, final = states[:, :-1], states[:, -1]

        # 4. the entering state's contribution to each output
        from_start = torch.exp(a_cum).permute(0, 1, 4, 2, 3).unsqueeze(-1)     # (b, c, L, G, hg, 1)
        y_off = torch.einsum("bclgn,bcghpn->bclghp", Ca, entering.view(b, c, G, hg, P, N))
        y = (y + y_off * from_start).reshape(b, c * L, H, P)[:, :T]
    return y.to(x.dtype), final


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
               initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Our Triton SSD (``sessa_kernels.ssd_triton``), forward and backward; same arguments and
    results as :func:`ssd_chunked`. Its kernels are custom operators, so a compiled block stays
    one graph around them (no graph break)."""
    try:
        from sessa_kernels.ssd_triton import ssd_triton as kernel
    except ImportError as err:
        raise ImportError("model.mamba2.impl=triton needs triton (pip install "
                          "'sessa_pt[kernels]'); or use impl=chunked") from err
    return kernel(x, dt, A, B, C, chunk_size, initial_state)


@torch.compiler.disable
def ssd_fla(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
            initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The SSD through flash-linear-attention's ``chunk_simple_gla`` (pure Triton): the SSD is
    its scalar-decay case with q = C, k = B, v = x dt, log-decay g = dt A and scale 1, with the
    state kept in our (P, N) layout (fla 0.6's ``state_v_first``); B/C groups are expanded to the
    heads. Its backward needs triton >= 3.7.1 on Hopper (fla refuses older ones there, fla#640).
    """
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ImportError("model.mamba2.impl=fla needs flash-linear-attention "
                          "(pip install 'sessa_pt[fla]'); or use impl=triton") from err
    _check_ssd_inputs(x, dt, A, B, C, initial_state)
    hg = x.shape[2] // B.shape[2]
    q, k = (t.repeat_interleave(hg, dim=2) if hg > 1 else t for t in (C, B))
    v = (x * dt.unsqueeze(-1).to(x.dtype)).to(x.dtype)
    g = (dt.float() * A.float()).contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    y, final = chunk_simple_gla(
        q.contiguous(), k.contiguous(), v.contiguous(), g, scale=1.0, initial_state=h0,
        output_final_state=True, state_v_first=True, chunk_size=chunk_size)
    return y.to(x.dtype), final.float()


SSD_IMPLS = {"chunked": ssd_chunked, "sequential": ssd_sequential, "triton": ssd_triton,
             "fla": ssd_fla}

# fla's gated backward is miscompiled by triton < 3.7.1 on Hopper (fla#640)
_FLA_MIN_TRITON = (3, 7, 1)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


# Under torch.compile the probing below (imports, version strings) would break the graph of
# every mixer; its answer depends only on the installed packages, so dynamo takes it as a
# constant (called eagerly while tracing).
@torch.compiler.assume_constant_result
def resolve_ssd_impl(impl: str, device: torch.device | str) -> str:
    """The SSD path that ``impl`` selects on ``device``.

    ``auto``: on CUDA, fla's ``chunk_simple_gla`` where it is installed and triton >= 3.7.1,
    else our Triton kernels where triton is installed, else the PyTorch ``chunked`` SSD; off
    CUDA always ``chunked``. Explicit ``triton``/``fla`` off CUDA raise (the interpreter is for
    tests, which call the kernels directly)."""
    if impl not in MAMBA2_IMPLS:
        raise ValueError(f"unknown Mamba2 impl {impl!r}; choose one of {MAMBA2_IMPLS}")
    cuda = torch.device(device).type == "cuda"
    if impl in ("chunked", "sequential"):
        return impl
    if impl in ("triton", "fla") and not cuda:
        raise ValueError(f"model.mamba2.impl={impl} runs on CUDA GPUs only (this run is on "
                         f"{device}); use impl=auto or impl=chunked")
    if impl != "auto":
        return impl
    if not cuda:
        return "chunked"
    try:
        import triton
    except ImportError:
        return "chunked"
    if _version_tuple(triton.__version__) >= _FLA_MIN_TRITON:
        try:
            import fla.ops.simple_gla  # noqa: F401
            return "fla"
        except ImportError:
            pass
    return "triton"


@torch.compiler.assume_constant_result
def _checked_ssd_path(impl: str, chunk_size: int, device: torch.device | str) -> str:
    """:func:`resolve_ssd_impl`, and a clear error where the Triton SSD cannot tile the chunk."""
    path = resolve_ssd_impl(impl, device)
    if path == "triton":
        from sessa_kernels.ssd_triton import check_chunk_size

        check_chunk_size(chunk_size)
    return path


def padded_linear(a: Tensor, weight: Tensor, multiple: int = 64) -> Tensor:
    """``a @ weight.T`` computed with ``weight``'s rows zero-padded to a multiple of
    ``multiple``; returns the true columns as a view of the padded output, so every row starts
    at an aligned address and the GEMM has an aligned width (its gradient reaches ``weight``
    through the pad)."""
    width = weight.shape[0]
    if width % multiple == 0:
        return F.linear(a, weight)
    return F.linear(a, F.pad(weight, (0, 0, 0, -width % multiple)))[..., :width]


class AlignedLinear(nn.Linear):
    """nn.Linear whose CUDA GEMM runs through :func:`padded_linear` (rows padded to a multiple
    of ``multiple``): the output is a view of an aligned buffer. Same parameters and state dict
    as nn.Linear; it stays a module call, so hooks on it (ZeRO-3 gathering) still run."""

    multiple = 64

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda or self.out_features % self.multiple == 0:
            return super().forward(x)
        out = padded_linear(x, self.weight, self.multiple)
        return out if self.bias is None else out + self.bias


class CausalDepthwiseConv1d(nn.Conv1d):
    """nn.Conv1d (depthwise, no padding) that also takes the channels-last layout:
    ``forward(x, channels_last=True)`` maps (B, T + K - 1, C) to (B, T, C) as K shifted
    multiply-adds, no transposes. Same parameters as nn.Conv1d; both layouts go through the
    module call, so hooks on it (ZeRO-3 gathering) run."""

    def forward(self, x: Tensor, channels_last: bool = False) -> Tensor:
        if not channels_last:
            return super().forward(x)
        K = self.kernel_size[0]
        T = x.shape[1] - (K - 1)
        w = self.weight[:, 0, :].to(x.dtype)                       # (C, K)
        out = x[:, K - 1:K - 1 + T] * w[:, K - 1]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        for j in range(K - 1):
            out = out + x[:, j:j + T] * w[:, j]
        return out


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z)) * weight``, the RMS taken over groups of ``group_size`` channels
    (one group per B/C group, as in Mamba-2), in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"dim={dim} must be divisible by group_size={group_size}")
        self.dim, self.group_size, self.eps = dim, group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        h = (y * F.silu(z)).to(accumulation_dtype(y.dtype))
        g = h.unflatten(-1, (self.dim // self.group_size, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return g.flatten(-2).to(y.dtype) * self.weight


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: (B, T, D) -> (B, T, D).

    ``d_inner = expand * d_model`` channels in ``H = d_inner / head_dim`` heads; ``n_groups``
    groups of B/C of size ``d_state`` shared by ``H / n_groups`` heads each. ``impl`` picks the
    SSM algorithm of the parallel forward: ``"chunked"`` (PyTorch SSD), ``"sequential"`` (the
    scan), ``"triton"`` (our Triton SSD), ``"fla"`` (flash-linear-attention) or ``"auto"``
    (:func:`resolve_ssd_impl`, per device at forward time). Decoding (T == 1 with a cache) always
    takes the recurrent step.

    ``in_proj``'s output width ``2 E + 2 G N + H`` is odd for many sizes (3611 at d_model 864).
    On CUDA its GEMM runs against the weight zero-padded to a multiple of 64 rows
    (:class:`AlignedLinear`), so the output rows and the z/xBC/dt slices start 16-byte aligned
    (no align-1 GEMMs, no misaligned views for compiled kernels); the parameter itself keeps its
    plain shape.

    Parameters (roughly ``3 D d_inner`` for expand=2, i.e. ~6 D^2):
    ``in_proj`` D x (2 d_inner + 2 G N + H), ``conv1d`` (d_inner + 2 G N) x (d_conv + 1),
    ``dt_bias``, ``A_log``, ``D_skip`` (H each), ``norm.weight`` (d_inner), ``out_proj``
    d_inner x D. ``dt_bias``, ``A_log``, ``D_skip`` and ``norm.weight`` carry
    ``_no_reinit = True`` (and ``_no_weight_decay = True`` for the first three).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        impl: str = "chunked",
        conv_impl: str = "conv1d",
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                        ("expand", expand), ("head_dim", head_dim), ("n_groups", n_groups),
                        ("chunk_size", chunk_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"expand * d_model = {expand} * {d_model} = {d_inner} must be "
                             f"divisible by head_dim={head_dim}; change head_dim, expand or "
                             f"d_model")
        n_heads = d_inner // head_dim
        if n_heads % n_groups:
            raise ValueError(f"the number of heads expand * d_model / head_dim = {n_heads} must "
                             f"be divisible by n_groups={n_groups}; change n_groups or head_dim")
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init_floor <= 0.0:
            raise ValueError(f"dt_init_floor must be > 0, got {dt_init_floor}")
        if impl not in MAMBA2_IMPLS:
            raise ValueError(f"unknown Mamba2 impl {impl!r}; choose one of {MAMBA2_IMPLS}")
        if conv_impl not in MAMBA2_CONV_IMPLS:
            raise ValueError(f"unknown Mamba2 conv_impl {conv_impl!r}; choose one of "
                             f"{MAMBA2_CONV_IMPLS}")
        self.conv_impl = conv_impl
        if impl == "triton":
            from sessa_kernels.ssd_triton import check_chunk_size

            check_chunk_size(chunk_size)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.head_dim, self.n_groups, self.chunk_size, self.impl = (head_dim, n_groups,
                                                                    chunk_size, impl)
        self.d_inner, self.n_heads = d_inner, n_heads
        self.conv_dim = d_inner + 2 * n_groups * d_state

        self.in_proj = AlignedLinear(d_model, 2 * d_inner + 2 * n_groups * d_state + n_heads,
                                     bias=False)
        # No padding here: forward prepends the d_conv - 1 past inputs (zeros or the cache), so
        # the conv yields exactly T outputs.
        self.conv1d = CausalDepthwiseConv1d(self.conv_dim, self.conv_dim, d_conv,
                                            groups=self.conv_dim, bias=True)
        # softplus(dt_bias) log-uniform in [dt_min, dt_max], floored at dt_init_floor
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1.0, 16.0)))
        self.D_skip = nn.Parameter(torch.ones(n_heads))
        for p in (self.dt_bias, self.A_log, self.D_skip):
            p._no_reinit = True
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // n_groups, eps=1e-5)
        self.norm.weight._no_reinit = True
        # The depthwise conv keeps nn.Conv1d's fan-in init: a generic N(0, 0.02) re-init would
        # shrink its 4-tap output ~25x and starve the SSM at the start of training.
        self.conv1d.weight._no_reinit = True
        self.conv1d.bias._no_reinit = True
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def init_cache(self) -> Mamba2Cache:
        return Mamba2Cache()

    def _conv(self, xBC: Tensor, cache: Mamba2Cache | None) -> Tensor:
        """Causal depthwise conv + SiLU over (B, T, conv_dim); updates the cache's conv state.

        ``conv_impl="conv1d"``: nn.Conv1d (cuDNN on GPU) on the channels-first transpose;
        ``"shifts"``: the same sum as d_conv shifted multiply-adds in the (B, T, C) layout,
        no transposes (under torch.compile one fused elementwise kernel each way)."""
        k = self.d_conv - 1
        if self.conv_impl == "shifts":
            if cache is None or cache.conv_state is None:
                full = F.pad(xBC, (0, 0, k, 0))                   # (B, k + T, C)
            else:
                full = torch.cat([cache.conv_state.transpose(1, 2).to(xBC.dtype), xBC], dim=1)
            if cache is not None:
                cache.conv_state = full[:, full.shape[1] - k:].transpose(1, 2)
            return F.silu(self.conv1d(full, channels_last=True))
        xt = xBC.transpose(1, 2)                                   # (B, conv_dim, T)
        if cache is None or cache.conv_state is None:
            full = F.pad(xt, (k, 0))
        else:
            full = torch.cat([cache.conv_state.to(xt.dtype), xt], dim=-1)
        if cache is not None:
            cache.conv_state = full[..., full.shape[-1] - k:]
        return F.silu(self.conv1d(full)).transpose(1, 2)

    def ssd_path(self, device: torch.device | str) -> str:
        """The SSD implementation the parallel forward takes on ``device``."""
        return _checked_ssd_path(self.impl, self.chunk_size, device)

    def forward(self, a: Tensor, cache: Mamba2Cache | None = None) -> Tensor:
        b, T, _ = a.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt_raw = self.in_proj(a).split([self.d_inner, self.conv_dim, H], dim=-1)
        x, Bm, Cm = self._conv(xBC, cache).split([self.d_inner, G * N, G * N], dim=-1)
        x = x.view(b, T, H, P)
        acc = accumulation_dtype(a.dtype)
        dt = F.softplus(dt_raw.to(acc) + self.dt_bias.to(acc))
        A = -torch.exp(self.A_log.to(acc))
        # one token with a cache: the recurrent step (the scan of one token), on any device
        path = "sequential" if (cache is not None and T == 1) else self.ssd_path(a.device)
        y, state = SSD_IMPLS[path](x, dt, A, Bm.view(b, T, G, N), Cm.view(b, T, G, N),
                                   self.chunk_size,
                                   initial_state=None if cache is None else cache.ssm_state)
        if cache is not None:
            cache.ssm_state, cache.length = state, cache.length + T
        y = (y + x * self.D_skip.to(x.dtype).unsqueeze(-1)).reshape(b, T, self.d_inner)
        return self.out_proj(self.norm(y, z))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add) of matmuls and the conv, the convention of
        ``torch.utils.flop_counter`` (elementwise work - exp, gating, norm - is not counted).

        With d_inner = E, H heads of width P, G groups of size N, kernel K:
        projections ``2 D (2E + 2GN + H) + 2 E D``, conv ``2 K (E + 2GN)``; and the SSD, with
        chunk length ``L = min(chunk_size, T)``, ``c = ceil(T / L)`` chunks and the padded length
        ``T_p = c L``, per token:
        ``(T_p / T) (2 L G N  +  2 L H P  +  2 H P N  +  2 H P N)  +  2 H P N (c+1)^2 / T``
        (C.B scores, masked scores x inputs, chunk states, state -> output, state passing).
        For ``impl="sequential"`` the SSM term is the scan's readout ``2 H P N``.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        D, E, H, P = self.d_model, self.d_inner, self.n_heads, self.head_dim
        G, N, K, T = self.n_groups, self.d_state, self.d_conv, seq_len
        proj = 2 * D * (2 * E + 2 * G * N + H) + 2 * E * D
        conv = 2 * K * (E + 2 * G * N)
        if self.impl == "sequential":
            return float(proj + conv + 2 * H * P * N)
        # chunked, triton, fla and auto all count the chunked SSD's products
        L = min(self.chunk_size, T)
        c = -(-T // L)
        per_padded_token = 2 * L * G * N + 2 * L * H * P + 4 * H * P * N
        ssd = per_padded_token * c * L / T + 2 * H * P * N * (c + 1) ** 2 / T
        return float(proj + conv + ssd)
