"""Model configuration: one dataclass tree that builds every model sessa_pt trains.

A model is an embedding, ``n_layers`` blocks, a final LayerNorm and an LM head. Each block is the
paper's gated block (``block: gated``) or a conventional attention + SwiGLU block
(``block: transformer``); its sequence mixer is ``mixer`` for every layer, or per layer from
``layer_mixers`` (hybrids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# The choices of every enum-like field (the loader refuses anything else, naming these).
Mixer = Literal["sessa", "attention", "mamba2"]
Block = Literal["gated", "transformer"]
SessaVariant = Literal["reference", "paper"]
SessaImpl = Literal["dense", "chunked", "triton"]
SessaSolve = Literal["panel", "panel_inverse", "queue"]
SESSA_SOLVES: tuple[str, ...] = get_args(SessaSolve)
Mamba2Impl = Literal["auto", "chunked", "sequential", "triton", "fla"]
Mamba2Conv = Literal["conv1d", "shifts"]
MIXERS: tuple[str, ...] = get_args(Mixer)
BLOCKS: tuple[str, ...] = get_args(Block)


@dataclass
class SessaOptions:
    variant: SessaVariant = "reference"  # reference (authors' release) | paper
    gamma_max: float = 0.999            # reference variant only
    gamma_bias_init: float | None = None  # None: 1.0 (reference) / 0.0 (paper)
    fb_dim: int | None = None           # feedback width; None = d_model (paper variant may differ)
    impl: SessaImpl = "dense"           # the solve: dense (T x T reference) | chunked (PyTorch,
                                        # O(T) memory) | triton (fused kernels, GPU)
    chunk_size: int = 64                # rows solved together. dense: unused; chunked: any
                                        # positive value (same result up to rounding);
                                        # triton: 16, 32, 64 or 128 (64 is the measured one)
    solve: SessaSolve = "panel"         # triton only: panel (scores once per super-chunk
                                        # into a scratch of <= panel_mib; the faster) |
                                        # panel_inverse (panel, each chunk's in-chunk system
                                        # inverted in the parallel pass: one product per
                                        # sequential step; rounds differently) | queue
                                        # (scores recomputed per channel block, no scratch)
    panel_mib: float = 256.0            # triton solve=panel: scratch budget in MiB; sets the
                                        # super-chunk width W (memory vs time, same result)
    feedback: bool = True               # false: the ablation without the feedback branch (s = f;
                                        # its parameters are not created)

    def errors(self) -> list[str]:
        from sessa_pt.models.feedback import FEEDBACK_IMPLS

        e = []
        if self.impl not in FEEDBACK_IMPLS:
            e.append(f"model.sessa.impl={self.impl!r}: choose one of {FEEDBACK_IMPLS}")
        if self.chunk_size < 1:
            e.append(f"model.sessa.chunk_size={self.chunk_size} must be positive")
        elif self.impl == "triton" and self.chunk_size not in (16, 32, 64, 128):
            e.append(f"model.sessa.chunk_size={self.chunk_size}: the Triton kernels take 16, "
                     "32, 64 or 128 rows per chunk (64 is the tuned default)")
        if self.solve not in SESSA_SOLVES:
            e.append(f"model.sessa.solve={self.solve!r}: choose one of {SESSA_SOLVES}")
        if not self.panel_mib > 0:
            e.append(f"model.sessa.panel_mib={self.panel_mib} must be positive")
        return e


@dataclass
class Mamba2Options:
    d_state: int = 64                   # SSM state size N per head
    d_conv: int = 4                     # causal depthwise conv width
    expand: int = 2                     # inner width = expand * d_model
    head_dim: int = 64                  # channels per SSM head (inner width / head_dim heads)
    n_groups: int = 1                   # B/C groups shared by the heads (TP splits them)
    chunk_size: int = 64                # SSD chunk length (chunked / triton)
    # SSD path of the parallel forward: auto (CUDA: fla where triton >= 3.7.1 and fla is
    # installed, else our Triton kernels; CPU: chunked) | chunked (PyTorch SSD, the reference)
    # | sequential (reference scan) | triton (our Triton SSD, CUDA; chunk_size a power of two in
    # 16..256) | fla (flash-linear-attention's chunk_simple_gla, CUDA). The run's log says which.
    impl: Mamba2Impl = "auto"
    # causal depthwise conv: conv1d (nn.Conv1d, cuDNN on GPU, channels-first transposes) |
    # shifts (d_conv shifted multiply-adds in the (B, T, C) layout; fuses under compile)
    conv_impl: Mamba2Conv = "conv1d"


@dataclass
class ModelConfig:
    vocab_size: int = 4096              # >= the tokenizer's vocabulary (pad to a multiple of 128
                                        # so that any TP size divides it)
    d_model: int = 256                  # residual stream width D
    n_layers: int = 4                   # blocks
    n_heads: int = 4                    # attention heads (the forward branch's, for Sessa)
    n_kv_heads: int | None = None       # None = n_heads (no GQA)
    mixer: Mixer = "sessa"              # default mixer of every layer: sessa | attention | mamba2
    layer_mixers: list[Mixer] | None = None  # optional per-layer mixers (length n_layers)
    block: Block = "gated"              # gated (paper) | transformer (pre-norm attn + SwiGLU)
    mlp_hidden: int | None = None       # transformer block MLP width; None = 8/3 d rounded to 64
    tie_embeddings: bool = True         # the LM head reuses the embedding matrix
    use_rope: bool = True               # rotary positions in the (forward) attention
    rope_base: float = 10000.0          # RoPE frequency base
    init_std: float = 0.02              # std of the normal init of weights (residual outputs
                                        # scaled by 1/sqrt(2 n_layers))
    sessa: SessaOptions = field(default_factory=SessaOptions)
    mamba2: Mamba2Options = field(default_factory=Mamba2Options)

    def mixers(self) -> list[str]:
        return list(self.layer_mixers) if self.layer_mixers else [self.mixer] * self.n_layers

    def validate(self) -> ModelConfig:
        errors = []
        if self.vocab_size <= 0 or self.d_model <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            errors.append("vocab_size, d_model, n_layers and n_heads must be positive")
        if self.layer_mixers is not None and len(self.layer_mixers) != self.n_layers:
            errors.append(f"model.layer_mixers has {len(self.layer_mixers)} entries; "
                          f"it needs one per layer (n_layers={self.n_layers})")
        for m in self.mixers():
            if m not in MIXERS:
                errors.append(f"unknown mixer {m!r}: choose from {MIXERS}")
        if self.block not in BLOCKS:
            errors.append(f"unknown block {self.block!r}: choose from {BLOCKS}")
        if self.block == "transformer" and any(m != "attention" for m in self.mixers()):
            errors.append("block=transformer is the attention + MLP baseline; set mixer=attention")
        if self.d_model % self.n_heads:
            errors.append(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        elif self.use_rope and (self.d_model // self.n_heads) % 2:
            errors.append(f"RoPE needs an even head dim; d_model/n_heads = "
                          f"{self.d_model // self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            errors.append(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        if "sessa" in self.mixers():
            errors += self.sessa.errors()
        if "mamba2" in self.mixers():
            d_inner = self.mamba2.expand * self.d_model
            if d_inner % self.mamba2.head_dim:
                errors.append(f"mamba2: expand*d_model={d_inner} must be divisible by "
                              f"mamba2.head_dim={self.mamba2.head_dim}")
            from sessa_pt.models.mamba2 import MAMBA2_IMPLS

            if self.mamba2.impl not in MAMBA2_IMPLS:
                errors.append(f"unknown model.mamba2.impl {self.mamba2.impl!r}: choose from "
                              f"{MAMBA2_IMPLS}")
            from sessa_pt.models.mamba2 import MAMBA2_CONV_IMPLS

            if self.mamba2.conv_impl not in MAMBA2_CONV_IMPLS:
                errors.append(f"unknown model.mamba2.conv_impl {self.mamba2.conv_impl!r}: "
                              f"choose from {MAMBA2_CONV_IMPLS}")
            c = self.mamba2.chunk_size
            if self.mamba2.impl == "triton" and (c < 16 or c > 256 or c & (c - 1)):
                errors.append(f"model.mamba2.impl=triton needs chunk_size a power of two in "
                              f"16..256, got {c}")
        if errors:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(errors))
        return self
