"""Residual blocks: the paper's gated block around any sequence mixer, and a conventional
pre-norm attention + SwiGLU MLP block for standard Transformer baselines.

Gated block (SPEC_SESSA.md section 1; there is no separate MLP in the paper's model):
    x~ = LayerNorm(x); (a, g) = split(W_in x~ + b_in); a_bar = GELU(a)   (exact erf GELU)
    y  = x + W_out(mixer(a_bar) * g) + b_out                             (g: no activation)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sessa_pt.models.rope import rope_inv_freq
from sessa_pt.models.sessa import SessaMixer


class GatedBlock(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, *, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.d_model = d_model
        self.ln = nn.LayerNorm(d_model, eps=ln_eps)
        self.W_in = nn.Linear(d_model, 2 * d_model, bias=True)
        self.mixer = mixer
        self.W_out = nn.Linear(d_model, d_model, bias=True)
        # Hook point for tensor parallelism: a TP rank keeps its slice of the mixer's output
        # channels (the Sessa mixer slices internally, before its solve).
        self.mixer_out_to_local: nn.Module = nn.Identity()

    def forward(self, x: Tensor, cache=None) -> Tensor:
        h = self.W_in(self.ln(x))
        # a is always full width; g may be this rank's channel slice under tensor parallelism.
        a, g = h.split([self.d_model, h.shape[-1] - self.d_model], dim=-1)
        s = self.mixer(F.gelu(a), cache) if cache is not None else self.mixer(F.gelu(a))
        return x + self.W_out(self.mixer_out_to_local(s) * g)

    def init_cache(self):
        return self.mixer.init_cache()

    def flops_per_token(self, seq_len: int) -> float:
        D = self.d_model
        return 2 * D * 2 * D + 2 * D * D + self.mixer.flops_per_token(seq_len)


class SessaBlock(GatedBlock):
    """The gated block with a Sessa mixer (``SessaMixer`` keyword arguments pass through)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 **mixer_kwargs) -> None:
        super().__init__(d_model, SessaMixer(d_model, n_heads, n_kv_heads, **mixer_kwargs))

    @classmethod
    def from_reference(cls, state_dict: dict[str, Tensor], n_heads: int,
                       n_kv_heads: int | None = None, **mixer_kwargs) -> SessaBlock:
        """A block whose forward equals the authors' reference-release layer.

        ``state_dict`` is one layer's state (names in SPEC_SESSA.md section 2, which are also
        ours). The buffer ``mixer.rope_inv_freq`` sets the RoPE base; boolean mask buffers are
        ignored. Loading is strict: a missing, unexpected or mis-shaped tensor is an error.
        """
        sd = {k: v for k, v in state_dict.items()
              if k != "mixer.rope_inv_freq" and v.dtype != torch.bool}
        if "mixer.gamma_bias" in sd:      # the reference stores a 0-dim scalar; ours is (1,)
            sd["mixer.gamma_bias"] = sd["mixer.gamma_bias"].reshape(1)
        if "W_in.weight" not in sd:
            raise KeyError("not a Sessa reference layer: 'W_in.weight' is missing "
                           f"(keys: {sorted(state_dict)[:8]}...)")
        d_model = sd["W_in.weight"].shape[1]
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}")
        kv_rows = sd["mixer.k_proj.weight"].shape[0]
        inferred_kv = kv_rows // (d_model // n_heads)
        if n_kv_heads is not None and n_kv_heads != inferred_kv:
            raise ValueError(f"n_kv_heads={n_kv_heads} but mixer.k_proj.weight has {kv_rows} rows "
                             f"= {inferred_kv} heads of width {d_model // n_heads}")
        inv_freq = state_dict.get("mixer.rope_inv_freq")
        if inv_freq is not None and inv_freq.numel() > 1 and "rope_base" not in mixer_kwargs:
            mixer_kwargs["rope_base"] = _rope_base_of(inv_freq)
        dtype = sd["W_in.weight"].dtype
        block = cls(d_model, n_heads, inferred_kv, **mixer_kwargs).to(dtype)
        expected = block.state_dict()
        for k, v in sd.items():
            if k in expected and expected[k].shape != v.shape:
                raise ValueError(f"{k}: reference shape {tuple(v.shape)} != expected "
                                 f"{tuple(expected[k].shape)} for d_model={d_model}, "
                                 f"n_heads={n_heads}, n_kv_heads={inferred_kv}")
        block.load_state_dict(sd, strict=True)
        return block


def _rope_base_of(inv_freq: Tensor) -> float:
    """The RoPE base that produced a saved ``rope_inv_freq`` buffer (rounded to an integer base
    when that reproduces the buffer: bases are integers in practice, the buffer is float32)."""
    head_dim = 2 * inv_freq.numel()
    base = float(inv_freq[1].double() ** (-head_dim / 2))
    rounded = float(round(base))
    if torch.allclose(rope_inv_freq(head_dim, rounded).double(), inv_freq.double(), rtol=1e-5):
        return rounded
    if not torch.allclose(rope_inv_freq(head_dim, base).double(), inv_freq.double(), rtol=1e-4):
        raise ValueError("mixer.rope_inv_freq is not base^(-2i/d) for any base: the checkpoint "
                         "uses a RoPE layout this importer does not know")
    return base


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 8/3 d_model rounded up to a multiple (about 8 d_model^2 params)."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def flops_per_token(self) -> float:
        return float(2 * 3 * self.d_model * self.hidden)


class TransformerBlock(nn.Module):
    """Pre-norm x + Attn(LN(x)); x + SwiGLU(LN(x)). ``attn`` is an AttentionMixer."""

    def __init__(self, d_model: int, attn: nn.Module, mlp_hidden: int | None = None, *,
                 ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.d_model = d_model
        self.ln1 = nn.LayerNorm(d_model, eps=ln_eps)
        self.attn = attn
        self.ln2 = nn.LayerNorm(d_model, eps=ln_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden or swiglu_hidden(d_model))

    def forward(self, x: Tensor, cache=None) -> Tensor:
        h = self.ln1(x)
        x = x + (self.attn(h, cache) if cache is not None else self.attn(h))
        return x + self.mlp(self.ln2(x))

    def init_cache(self):
        return self.attn.init_cache()

    def flops_per_token(self, seq_len: int) -> float:
        return self.attn.flops_per_token(seq_len) + self.mlp.flops_per_token()
