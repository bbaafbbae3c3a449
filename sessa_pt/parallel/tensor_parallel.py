"""The tensor-parallel plan: re-express a plain, fully initialised stage with megatron-core
``tensor_parallel`` layers, each rank keeping its slice of the same weights (so TP=2 starts from
exactly the TP=1 model).

Plan (the models expose identity hook points that this fills in):
  attention mixer      q/k/v column-parallel (heads split), out_proj row-parallel (all-reduce)
  Sessa mixer          as attention; f is then cut to this rank's channel slice (each rank solves
                       its channels: the T x T routing is shared by all channels); the feedback
                       projection and gain are replicated and their inputs' gradients summed
                       over ranks (copy_to_tensor_model_parallel_region)
  gated block          W_in: the a half replicated (every projection reads all of a_bar), the gate
                       half column-parallel (matching the channel slice); W_out row-parallel;
                       non-Sessa mixers' outputs are cut to the channel slice
  transformer block    attention as above, SwiGLU w_gate/w_up column-, w_down row-parallel
  embedding            megatron VocabParallelEmbedding (vocab rows split)
  head                 final norm replicated; logits vocab-parallel (against the local embedding
                       rows when tied); loss: vocab_parallel_cross_entropy
  Mamba2 mixer         heads and B/C groups split (n_groups % tp == 0): in_proj column-parallel
                       over [z | x | B | C | dt] section by section, the depthwise conv, dt_bias,
                       A_log, D_skip and the grouped norm sliced alike, out_proj row-parallel

``plain_state_dict`` undoes the plan, gathering slices over the TP group, so checkpoints can be
exported as the plain DecoderLM's state dict whatever the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sessa_pt.models.attention import AttentionMixer
from sessa_pt.models.blocks import GatedBlock, SwiGLU, TransformerBlock
from sessa_pt.models.lm import LMHead, TokenEmbedding
from sessa_pt.models.sessa import SessaMixer


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def megatron_config(tp: int, pp: int):
    from megatron.core import ModelParallelConfig

    # use_cpu_initialization + perform_initialization=False: megatron allocates the local shard
    # and we copy our own weights in; nothing touches the CUDA RNG tracker.
    return ModelParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               use_cpu_initialization=True, perform_initialization=False,
                               params_dtype=torch.float32, pipeline_dtype=torch.float32,
                               sequence_parallel=False)


def _slice(t: Tensor, dim: int) -> Tensor:
    ps = _ps()
    n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return t.chunk(n, dim=dim)[r]


def _gather(t: Tensor, dim: int) -> Tensor:
    ps = _ps()
    group = ps.get_tensor_model_parallel_group()
    n = dist.get_world_size(group)
    if n == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _noop_init(weight: Tensor) -> None:
    return None


def _mark_partitioned(weight: Tensor, dim: int) -> None:
    """megatron sets the ``tensor_model_parallel`` flags of a weight only inside its own
    initialisation, which ``perform_initialization=False`` skips; DeepSpeed's grad norm needs
    them (unflagged weights count on TP rank 0 only), so set them here."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    if not getattr(weight, "tensor_model_parallel", False):
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(weight, attr):
                delattr(weight, attr)
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


class ColumnLinear(nn.Module):
    """megatron ColumnParallelLinear holding this rank's rows of ``full``; returns (B, T, out/tp)."""

    def __init__(self, full: nn.Linear, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.inner = ColumnParallelLinear(full.in_features, full.out_features, config=config,
                                          init_method=_noop_init, bias=full.bias is not None,
                                          gather_output=False, skip_bias_add=False)
        with torch.no_grad():
            self.inner.weight.copy_(_slice(full.weight, 0))
            if full.bias is not None:
                self.inner.bias.copy_(_slice(full.bias, 0))
        _mark_partitioned(self.inner.weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)[0]

    def plain_state(self) -> dict[str, Tensor]:
        out = {"weight": _gather(self.inner.weight, 0)}
        if self.inner.bias is not None:
            out["bias"] = _gather(self.inner.bias, 0)
        return out


class RowLinear(nn.Module):
    """megatron RowParallelLinear over this rank's input slice; output all-reduced (full)."""

    def __init__(self, full: nn.Linear, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import RowParallelLinear

        self.inner = RowParallelLinear(full.in_features, full.out_features, config=config,
                                       init_method=_noop_init, bias=full.bias is not None,
                                       input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():
            self.inner.weight.copy_(_slice(full.weight, 1))
            if full.bias is not None:
                self.inner.bias.copy_(full.bias)
        _mark_partitioned(self.inner.weight, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)[0]

    def plain_state(self) -> dict[str, Tensor]:
        out = {"weight": _gather(self.inner.weight, 1)}
        if self.inner.bias is not None:
            out["bias"] = self.inner.bias.detach().clone()
        return out


class SplitInProj(nn.Module):
    """The gated block's W_in under TP: [a (replicated, D) | g (this rank's D/tp channels)]."""

    def __init__(self, full: nn.Linear, config) -> None:
        super().__init__()
        D = full.out_features // 2
        a_half = nn.Linear(full.in_features, D)
        g_half = nn.Linear(full.in_features, D)
        with torch.no_grad():
            a_half.weight.copy_(full.weight[:D])
            a_half.bias.copy_(full.bias[:D])
            g_half.weight.copy_(full.weight[D:])
            g_half.bias.copy_(full.bias[D:])
        self.W_a = a_half
        self.W_g = ColumnLinear(g_half, config)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.W_a(x), self.W_g(x)], dim=-1)

    def plain_state(self) -> dict[str, Tensor]:
        g = self.W_g.plain_state()
        return {"weight": torch.cat([self.W_a.weight.detach(), g["weight"]], 0),
                "bias": torch.cat([self.W_a.bias.detach(), g["bias"]], 0)}


class ScatterToChannels(nn.Module):
    """Keep this rank's slice of the last dim (backward: all-gather)."""

    def forward(self, x: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import scatter_to_tensor_model_parallel_region

        return scatter_to_tensor_model_parallel_region(x)


class SumGradsOverTP(nn.Module):
    """Identity forward; all-reduce of the gradient over the TP group in backward."""

    def forward(self, x: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x)


class VocabEmbedding(nn.Module):
    """megatron VocabParallelEmbedding holding this rank's vocab rows of ``full``."""

    def __init__(self, full: TokenEmbedding, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        V, D = full.weight.shape
        self.inner = VocabParallelEmbedding(V, D, init_method=_noop_init, config=config)
        with torch.no_grad():
            self.inner.weight.copy_(_slice(full.weight, 0))
        _mark_partitioned(self.inner.weight, 0)

    @property
    def weight(self) -> Tensor:
        return self.inner.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.inner(input_ids)

    def plain_state(self) -> dict[str, Tensor]:
        return {"weight": _gather(self.inner.weight, 0)}


class VocabParallelHead(nn.Module):
    """Final norm (replicated) and vocab-parallel logits (B, T, V/tp)."""

    def __init__(self, full: LMHead, config) -> None:
        super().__init__()
        self.norm = full.norm
        self.weight = None
        if full.weight is not None:
            self.weight = nn.Parameter(_slice(full.weight.detach(), 0).clone())
            _mark_partitioned(self.weight, 0)

    def forward(self, h: Tensor, embedding_weight: Tensor | None = None) -> Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        w = self.weight if self.weight is not None else embedding_weight
        return F.linear(copy_to_tensor_model_parallel_region(self.norm(h)), w)

    def plain_state(self) -> dict[str, Tensor]:
        out = {f"norm.{k}": v.detach().clone() for k, v in self.norm.state_dict().items()}
        if self.weight is not None:
            out["weight"] = _gather(self.weight, 0)
        return out


def vocab_parallel_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None
                           ) -> Tensor:
    """lm_loss over vocab-parallel logits (B, T, V/tp)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ce = vocab_parallel_cross_entropy(logits.float(), labels)
    if loss_mask is None:
        return ce.mean()
    m = loss_mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def _shard_sections(t: Tensor, sizes: list[int]) -> Tensor:
    """This rank's piece of every section of dim 0 (sections laid end to end), concatenated."""
    return torch.cat([_slice(part, 0) for part in t.split(sizes, dim=0)], dim=0)


def _unshard_sections(local: Tensor, sizes: list[int]) -> Tensor:
    """Inverse of _shard_sections over the TP group (collective)."""
    ps = _ps()
    n = ps.get_tensor_model_parallel_world_size()
    ranks = _gather(local, 0).split(sum(sizes) // n, dim=0)        # each rank's local block
    pieces = [r.split([s // n for s in sizes], dim=0) for r in ranks]
    return torch.cat([torch.cat([p[i] for p in pieces], 0) for i in range(len(sizes))], 0)


class SectionColumnLinear(ColumnLinear):
    """Column-parallel over several output sections at once (each section split over ranks)."""

    def __init__(self, full: nn.Linear, sizes: list[int], config) -> None:
        permuted = nn.Linear(full.in_features, full.out_features, bias=full.bias is not None)
        n = _ps().get_tensor_model_parallel_world_size()
        with torch.no_grad():   # order rows rank by rank, so a plain chunk is this rank's rows
            order = torch.cat([torch.cat([sec.chunk(n, 0)[r] for sec in
                                          torch.arange(full.out_features).split(sizes)])
                               for r in range(n)])
            permuted.weight.copy_(full.weight[order])
            if full.bias is not None:
                permuted.bias.copy_(full.bias[order])
        super().__init__(permuted, config)
        self.sizes = sizes

    def plain_state(self) -> dict[str, Tensor]:
        out = {"weight": _unshard_sections(self.inner.weight, self.sizes)}
        if self.inner.bias is not None:
            out["bias"] = _unshard_sections(self.inner.bias, self.sizes)
        return out


def _tp_mamba2(mixer, config) -> None:
    from sessa_pt.models.mamba2 import Mamba2Mixer

    n = _ps().get_tensor_model_parallel_world_size()
    E, G, N, H = mixer.d_inner, mixer.n_groups, mixer.d_state, mixer.n_heads
    if G % n or H % n:
        raise ValueError(f"mamba2 under tp={n} needs n_groups ({G}) and heads ({H}) divisible "
                         "by tp")
    in_sizes, conv_sizes = [E, E, G * N, G * N, H], [E, G * N, G * N]
    mixer.in_proj = SectionColumnLinear(mixer.in_proj, in_sizes, config)
    conv = mixer.conv1d
    local_conv = type(conv)(conv.in_channels // n, conv.out_channels // n, conv.kernel_size[0],
                            groups=conv.groups // n, bias=conv.bias is not None)
    with torch.no_grad():
        local_conv.weight.copy_(_shard_sections(conv.weight, conv_sizes))
        local_conv.bias.copy_(_shard_sections(conv.bias, conv_sizes))
    mixer.conv1d = local_conv
    for name in ("dt_bias", "A_log", "D_skip"):
        p = getattr(mixer, name)
        local = nn.Parameter(_slice(p.detach(), 0).clone())
        local._no_weight_decay = True
        setattr(mixer, name, local)
    mixer.norm.weight = nn.Parameter(_slice(mixer.norm.weight.detach(), 0).clone())
    mixer.norm.dim //= n
    mixer.out_proj = RowLinear(mixer.out_proj, config)
    mixer.d_inner, mixer.n_heads, mixer.n_groups = E // n, H // n, G // n
    mixer.conv_dim //= n
    for p in (mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D_skip,
              mixer.norm.weight):
        _mark_partitioned(p, 0)
    # Same module, plus the export that undoes the sharding (parameter names stay the plain ones).
    mixer.__class__ = type("TPMamba2Mixer", (Mamba2Mixer,), {
        "plain_state": _mamba2_plain_state, "_tp_sizes": (in_sizes, conv_sizes)})


def _mamba2_plain_state(self) -> dict[str, Tensor]:
    _, conv_sizes = self._tp_sizes
    out = {f"in_proj.{k}": v for k, v in self.in_proj.plain_state().items()}
    out.update({f"out_proj.{k}": v for k, v in self.out_proj.plain_state().items()})
    out["conv1d.weight"] = _unshard_sections(self.conv1d.weight, conv_sizes)
    out["conv1d.bias"] = _unshard_sections(self.conv1d.bias, conv_sizes)
    for name in ("dt_bias", "A_log", "D_skip"):
        out[name] = _gather(getattr(self, name), 0)
    out["norm.weight"] = _gather(self.norm.weight, 0)
    return out


# ---- applying the plan -----------------------------------------------------------------------

def _tp_attention(mixer: AttentionMixer, config) -> None:
    if mixer.n_heads == 1:
        raise ValueError("tensor parallelism needs n_heads > 1 (a single head cannot be split)")
    mixer.q_proj = ColumnLinear(mixer.q_proj, config)
    mixer.k_proj = ColumnLinear(mixer.k_proj, config)
    mixer.v_proj = ColumnLinear(mixer.v_proj, config)
    mixer.out_proj = RowLinear(mixer.out_proj, config)


def apply_tensor_parallel(stage: nn.Module, config) -> nn.Module:
    """Convert one model stage (embedding, block or head) in place; returns it."""
    if isinstance(stage, TokenEmbedding):
        return VocabEmbedding(stage, config)
    if isinstance(stage, LMHead):
        return VocabParallelHead(stage, config)
    if isinstance(stage, GatedBlock):
        mixer = stage.mixer
        if type(mixer).__name__ == "Mamba2Mixer":
            _tp_mamba2(mixer, config)
            stage.mixer_out_to_local = ScatterToChannels()
        elif not isinstance(mixer, AttentionMixer):
            raise TypeError(f"no tensor-parallel plan for {type(mixer).__name__}")
        else:
            _tp_attention(mixer, config)
        if isinstance(mixer, SessaMixer):
            mixer.f_to_local = ScatterToChannels()
            mixer.routing_grad_sync = SumGradsOverTP()
        elif isinstance(mixer, AttentionMixer):
            stage.mixer_out_to_local = ScatterToChannels()
        stage.W_in = SplitInProj(stage.W_in, config)
        stage.W_out = RowLinear(stage.W_out, config)
        return stage
    if isinstance(stage, TransformerBlock):
        _tp_attention(stage.attn, config)
        mlp: SwiGLU = stage.mlp
        mlp.w_gate = ColumnLinear(mlp.w_gate, config)
        mlp.w_up = ColumnLinear(mlp.w_up, config)
        mlp.w_down = RowLinear(mlp.w_down, config)
        return stage
    raise TypeError(f"no tensor-parallel plan for {type(stage).__name__}")


def plain_state_dict(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of the plain (un-sharded) module this one was converted from. Collective
    over the TP group: every TP rank must call it."""
    if hasattr(module, "plain_state"):
        return {prefix + k: v for k, v in module.plain_state().items()}
    out = {prefix + k: v.detach().clone()
           for k, v in list(module.named_parameters(recurse=False))
           + list(module.named_buffers(recurse=False)) if v is not None}
    for name, child in module.named_children():
        out.update(plain_state_dict(child, f"{prefix}{name}."))
    return out
