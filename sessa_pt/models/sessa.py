"""The Sessa mixer: a causal attention (forward branch) whose output drives a recurrence that
reads the mixer's own past outputs through a second attention (feedback branch).

    f = out_proj(MHA(a))                                    forward branch, RoPE, j <= t
    s_t = f_t + gamma_t * sum_{j<t} alpha[t, j] s_j         feedback, strict past, no RoPE

docs/model.md §2-§4. ``variant='reference'`` (default) follows the authors' release:
gamma_t = gamma_max * tanh(gamma_bias + a_t . w_gamma), gamma_bias initialised to 1.0 and one
feedback head of width D. ``variant='paper'``: gamma_t = tanh(a_t . w_gamma + b_gamma), b_gamma
initialised to 0, and a feedback width ``fb_dim`` that may differ from D.

``feedback=False`` is the ablation "Sessa without its feedback branch": s = f, and the feedback
parameters are not created, so parameter counts stay honest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sessa_pt.models.attention import AttentionMixer, KVCache, SeqBuffer
from sessa_pt.models.feedback import FEEDBACK_IMPLS, feedback_dense, sessa_feedback

SESSA_VARIANTS = ("reference", "paper")


class SessaMixer(AttentionMixer):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        variant: str = "reference",
        gamma_max: float = 0.999,
        gamma_bias_init: float | None = None,
        fb_dim: int | None = None,
        impl: str = "dense",
        chunk_size: int = 64,
        solve: str = "panel",
        panel_mib: float = 256.0,
        use_rope: bool = True,
        rope_base: float = 10000.0,
        feedback: bool = True,
    ) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, qkv_bias=True, use_rope=use_rope,
                         rope_base=rope_base)
        if variant not in SESSA_VARIANTS:
            raise ValueError(f"unknown Sessa variant {variant!r}; choose one of {SESSA_VARIANTS}")
        if impl not in FEEDBACK_IMPLS:
            raise ValueError(f"unknown feedback impl {impl!r}; choose one of {FEEDBACK_IMPLS}")
        if variant == "reference":
            if fb_dim not in (None, d_model):
                raise ValueError("the reference variant has one feedback head of width d_model; "
                                 "set variant='paper' to use another fb_dim")
            if not 0.0 < gamma_max < 1.0:
                raise ValueError(f"gamma_max must lie in (0, 1), got {gamma_max}")
        self.variant, self.impl, self.chunk_size = variant, impl, chunk_size
        self.solve, self.panel_mib = solve, panel_mib
        self.feedback = feedback
        self.fb_dim = d_model if fb_dim is None else fb_dim
        self.gamma_max = gamma_max if variant == "reference" else 1.0
        if gamma_bias_init is None:
            gamma_bias_init = 1.0 if variant == "reference" else 0.0
        # Hook points for tensor parallelism (identity here; sessa_pt.parallel replaces them):
        # the routing is shared by all channels, so a TP rank solves its own slice of channels
        # (f_to_local) and the routing inputs' gradients are summed over ranks (routing_grad_sync).
        self.f_to_local: nn.Module = nn.Identity()
        self.routing_grad_sync: nn.Module = nn.Identity()
        if not feedback:
            return
        self.proj_fb = nn.Linear(d_model, 2 * self.fb_dim, bias=True)       # [q_b | k_b]
        self.gamma_ctx = nn.Linear(d_model, 1, bias=False)
        # nn.Linear's default init gives the reference's spread of initial gains (mean ~0.7).
        self.gamma_ctx.weight._no_reinit = True
        # A plain Parameter, not a Linear bias, so generic re-initialisation never touches it
        # (docs/model.md §7, pitfall 5). Shape (1,) rather than the reference's scalar: DeepSpeed broadcasts
        # parameters as bytes, which a 0-dim tensor cannot be viewed as (from_reference
        # reshapes).
        self.gamma_bias = nn.Parameter(torch.full((1,), float(gamma_bias_init)))
        self.gamma_bias._no_reinit = True

    def _gain(self, logit: Tensor) -> Tensor:
        g = torch.tanh(self.gamma_bias + logit)
        return self.gamma_max * g if self.variant == "reference" else g

    def gamma(self, a: Tensor) -> Tensor:
        """Per-token feedback gain (B, T), strictly inside (-1, 1)."""
        return self._gain(self.gamma_ctx(a).squeeze(-1))

    def routing_projection(self, a: Tensor) -> Tensor:
        """[q_b | k_b | gamma logit | zeros] of every token, (B, T, 2 fb_dim + 1 + pad), from
        one GEMM whose width is padded to a multiple of 8 (16-byte rows in bf16). The gain's
        own D -> 1 projection (and its backward, a K = 1 outer product) ran as a width-1 GEMM
        on cuBLAS's alignment-1 kernels, 12.5% of a Sessa training step on the H200 (issue
        13); folded in here it costs 8 output columns. The parameters stay ``proj_fb`` and
        ``gamma_ctx``; ``flops_per_token`` counts the model's FLOPs, not the padding."""
        w, b, wg = self.proj_fb.weight, self.proj_fb.bias, self.gamma_ctx.weight
        pad = -(w.shape[0] + 1) % 8
        weight = torch.cat([w, wg, w.new_zeros(pad, w.shape[1])])
        bias = torch.cat([b, b.new_zeros(1 + pad)])
        return F.linear(a, weight, bias)

    def feedback_inputs(self, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q_b, k_b (B, T, fb_dim) and gamma (B, T). q_b and k_b are strided views of the
        fused projection; the feedback kernels make their own contiguous copies."""
        if not self.feedback:
            raise ValueError("this Sessa mixer has no feedback branch (model.sessa.feedback=false)")
        h = self.routing_projection(a)
        n, sync = self.fb_dim, self.routing_grad_sync
        # Under TP the gradient sum over ranks must come after every use that a rank's
        # channel slice makes partial: on q_b | k_b, and on gamma after the gain (so
        # gamma_bias, added after the projection, gets the summed gradient too).
        qk = sync(h[..., :2 * n])
        return qk[..., :n], qk[..., n:], sync(self._gain(h[..., 2 * n]))

    def init_cache(self) -> KVCache:
        if not self.feedback:
            return super().init_cache()
        return KVCache(extra={"k_b": SeqBuffer(1), "s": SeqBuffer(1)})

    def forward(self, a: Tensor, cache: KVCache | None = None) -> Tensor:
        f = self.f_to_local(super().forward(a, cache))
        if not self.feedback:
            return f
        q_b, k_b, gamma = self.feedback_inputs(a)
        if cache is None:
            return sessa_feedback(q_b, k_b, gamma, f, impl=self.impl, chunk_size=self.chunk_size,
                                  solve=self.solve, panel_mib=self.panel_mib)
        k_buf, s_buf = cache.extra["k_b"], cache.extra["s"]
        past_k, past_s = k_buf.view, s_buf.view
        if a.shape[1] == 1 and past_k is not None:
            # One new token: the fused decode read over the cache (Triton on GPU, and with
            # impl=triton also under Triton's interpreter).
            from sessa_kernels.decode import feedback_decode_step

            read = "triton" if self.impl == "triton" and f.dtype != torch.float64 else "auto"
            s = feedback_decode_step(q_b[:, 0], gamma[:, 0], f[:, 0], past_k, past_s,
                                     self.fb_dim**-0.5, impl=read).unsqueeze(1)
        else:
            s = feedback_dense(q_b, k_b, gamma, f, past_k_b=past_k, past_s=past_s)
        k_buf.append(k_b)
        s_buf.append(s)
        return s

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the attention branch, the feedback projections and gain, the
        T x T routing logits (full T^2, like attention: 2 T Dk per token) and the triangular
        solve (T^2 D / 2 multiply-adds per sequence: T D FLOPs per token)."""
        if not self.feedback:
            return super().flops_per_token(seq_len)
        D, Dk = self.d_model, self.fb_dim
        fb = 2 * D * 2 * Dk + 2 * D + 2 * seq_len * Dk + seq_len * D
        return super().flops_per_token(seq_len) + float(fb)
