"""Tensor parallelism as a declared plan: a plain, fully initialised stage is re-expressed with
megatron-core ``tensor_parallel`` layers, each rank keeping its slice of the same weights (so
TP=2 starts from exactly the TP=1 model).

The plan (``tp_plan``) names, per block type, what happens to each submodule, parameter and
hook point; one function (``apply_tensor_parallel``) carries it out:

  rule                 what a rank keeps
  Column               an nn.Linear's output rows 1/tp (megatron ColumnParallelLinear);
                       ``Column(sections)``: every section of the rows split alike
  Row                  an nn.Linear's input columns 1/tp, output all-reduced (RowParallelLinear)
  GatedInProj          the gated block's W_in: the ``a`` half replicated, the gate half Column
  Replicated           everything (listed so the table is complete)
  Sliced(sections)     a parameter's rows 1/tp, section by section (channel-sliced)
  LocalSize            an attribute (a width, a count) divided by tp
  Hook(module)         an identity hook point of the model replaced by a TP operation:
                       ScatterToChannels (keep this rank's channels; backward all-gathers) or
                       SumGradsOverTP (identity; backward all-reduces the gradient)
  VocabParallel        the whole stage: embedding or head with its vocabulary rows split

  block type        submodule                   rule
  attention mixer   q_proj, k_proj, v_proj      Column (heads split)
                    out_proj                    Row
  Sessa mixer       as attention, plus:
                    f_to_local                  Hook(ScatterToChannels): each rank solves its
                                                channels (the T x T routing is shared by all)
                    proj_fb, gamma_ctx,         Replicated
                    gamma_bias
                    routing_grad_sync           Hook(SumGradsOverTP): the routing inputs'
                                                gradients summed over ranks
  Mamba2 mixer      in_proj                     Column([z | x | B | C | dt] sections)
  (n_groups % tp    conv1d.weight, conv1d.bias  Sliced([x | B | C])
   == 0)            dt_bias, A_log, D_skip,     Sliced (heads / channels split)
                    norm.weight
                    d_inner, n_heads, n_groups, LocalSize
                    conv_dim, norm.dim,
                    conv1d.{in,out}_channels,
                    conv1d.groups
                    out_proj                    Row
  gated block       ln                          Replicated
                    W_in                        GatedInProj
                    mixer                       its mixer's plan
                    mixer_out_to_local          Hook(ScatterToChannels) for non-Sessa mixers
                    W_out                       Row
  transformer block ln1, ln2                    Replicated
                    attn                        the attention plan
                    mlp.w_gate, mlp.w_up        Column
                    mlp.w_down                  Row
  embedding         (the stage)                 VocabParallel: VocabParallelEmbedding
  head              (the stage)                 VocabParallel: final norm replicated, logits
                                                vocab-parallel (against the local embedding rows
                                                when tied); loss: vocab_parallel_cross_entropy

Every sliced parameter carries ``_tp_slice`` (its dim and sections); ``plain_state_dict``
undoes the plan by gathering each over the TP group, so checkpoints can be exported as the
plain DecoderLM's state dict whatever the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sessa_pt.models.attention import AttentionMixer
from sessa_pt.models.blocks import GatedBlock, TransformerBlock
from sessa_pt.models.lm import LMHead, TokenEmbedding, masked_loss_sum, mean_loss
from sessa_pt.models.mamba2 import Mamba2Mixer
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
        return vocab_logits(self.norm(h), self.weight if self.weight is not None
                            else embedding_weight)

    def plain_state(self) -> dict[str, Tensor]:
        out = {f"norm.{k}": v.detach().clone() for k, v in self.norm.state_dict().items()}
        if self.weight is not None:
            out["weight"] = _gather(self.weight, 0)
        return out


def vocab_logits(h: Tensor, weight: Tensor) -> Tensor:
    """Logits of normed hidden states against this rank's vocabulary rows (all rows at tp=1).
    Under TP every rank's logits depend on all of ``h``: its gradient is summed over ranks."""
    if dist.is_initialized() and _ps().model_parallel_is_initialized() \
            and _ps().get_tensor_model_parallel_world_size() > 1:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h)
    return F.linear(h, weight)


def vocab_parallel_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None
                           ) -> Tensor:
    """lm_loss over vocab-parallel logits (B, T, V/tp): megatron's per-token cross entropy,
    reduced by the models' masked mean."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ce = vocab_parallel_cross_entropy(logits.float(), labels)
    return mean_loss(*masked_loss_sum(ce, loss_mask))


def _shard_sections(t: Tensor, sizes: list[int], dim: int = 0) -> Tensor:
    """This rank's piece of every section of ``dim`` (sections laid end to end), concatenated."""
    return torch.cat([_slice(part, dim) for part in t.split(sizes, dim=dim)], dim=dim)


def _unshard_sections(local: Tensor, sizes: list[int], dim: int = 0) -> Tensor:
    """Inverse of _shard_sections over the TP group (collective)."""
    n = _ps().get_tensor_model_parallel_world_size()
    ranks = _gather(local, dim).split(sum(sizes) // n, dim=dim)   # each rank's local block
    pieces = [r.split([s // n for s in sizes], dim=dim) for r in ranks]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(len(sizes))], dim)


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



# ---- the plan ---------------------------------------------------------------------------------

def _tp_size() -> int:
    return _ps().get_tensor_model_parallel_world_size()


@dataclass(frozen=True)
class TPSlice:
    """How a sliced parameter was cut: along ``dim``, each of ``sections`` (None: the whole dim
    is one section) split evenly over the TP ranks. ``plain_state_dict`` gathers by it."""

    dim: int = 0
    sections: tuple[int, ...] | None = None

    def shard(self, full: Tensor) -> Tensor:
        if self.sections is None:
            return _slice(full, self.dim)
        return _shard_sections(full, list(self.sections), self.dim)

    def gather(self, local: Tensor) -> Tensor:
        if self.sections is None:
            return _gather(local, self.dim)
        return _unshard_sections(local.detach(), list(self.sections), self.dim)


class Rule:
    """What the plan does to one attribute ``name`` of ``owner`` (a submodule, a parameter, a
    hook point or a size)."""

    def apply(self, owner: nn.Module, name: str, config) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Column(Rule):
    sections: tuple[int, ...] | None = None

    def apply(self, owner, name, config):
        full = getattr(owner, name)
        setattr(owner, name, ColumnLinear(full, config) if self.sections is None
                else SectionColumnLinear(full, list(self.sections), config))


@dataclass(frozen=True)
class Row(Rule):
    def apply(self, owner, name, config):
        setattr(owner, name, RowLinear(getattr(owner, name), config))


@dataclass(frozen=True)
class GatedInProj(Rule):
    def apply(self, owner, name, config):
        setattr(owner, name, SplitInProj(getattr(owner, name), config))


@dataclass(frozen=True)
class Replicated(Rule):
    def apply(self, owner, name, config):
        if not hasattr(owner, name):
            raise AttributeError(f"the TP plan lists {type(owner).__name__}.{name}, which does "
                                 "not exist: update the plan with the model")


@dataclass(frozen=True)
class Sliced(Rule):
    """A parameter replaced by this rank's slice (its flags such as ``_no_weight_decay`` and
    ``_no_reinit`` kept), tagged with its :class:`TPSlice`."""

    sections: tuple[int, ...] | None = None
    dim: int = 0

    def apply(self, owner, name, config):
        full = getattr(owner, name)
        how = TPSlice(self.dim, self.sections)
        local = nn.Parameter(how.shard(full.detach()).clone(), requires_grad=full.requires_grad)
        for flag in ("_no_weight_decay", "_no_reinit"):
            if hasattr(full, flag):
                setattr(local, flag, getattr(full, flag))
        local._tp_slice = how
        _mark_partitioned(local, self.dim)
        setattr(owner, name, local)


@dataclass(frozen=True)
class LocalSize(Rule):
    def apply(self, owner, name, config):
        n, full = _tp_size(), getattr(owner, name)
        if full % n:
            raise ValueError(f"{type(owner).__name__}.{name}={full} is not divisible by tp={n}")
        setattr(owner, name, full // n)


@dataclass(frozen=True)
class Hook(Rule):
    make: Callable[[], nn.Module]

    def apply(self, owner, name, config):
        if not isinstance(getattr(owner, name), nn.Identity):
            raise TypeError(f"{type(owner).__name__}.{name} is not an identity hook point "
                             "(tensor parallelism applied twice?)")
        setattr(owner, name, self.make())


@dataclass(frozen=True)
class VocabParallel(Rule):
    """The whole stage: embedding or head with the vocabulary rows split."""


Plan = list[tuple[str, Rule]]


def _attention_plan(mixer: AttentionMixer) -> Plan:
    if mixer.n_heads == 1:
        raise ValueError("tensor parallelism needs n_heads > 1 (a single head cannot be split)")
    return [("q_proj", Column()), ("k_proj", Column()), ("v_proj", Column()),
            ("out_proj", Row())]


def _sessa_plan(mixer: SessaMixer) -> Plan:
    return _attention_plan(mixer) + [
        ("f_to_local", Hook(ScatterToChannels)), ("proj_fb", Replicated()),
        ("gamma_ctx", Replicated()), ("gamma_bias", Replicated()),
        ("routing_grad_sync", Hook(SumGradsOverTP))]


def _mamba2_plan(mixer: Mamba2Mixer) -> Plan:
    n = _tp_size()
    E, G, N, H = mixer.d_inner, mixer.n_groups, mixer.d_state, mixer.n_heads
    if G % n or H % n:
        raise ValueError(f"mamba2 under tp={n} needs n_groups ({G}) and heads ({H}) divisible "
                         "by tp")
    conv = (E, G * N, G * N)
    return [("in_proj", Column((E, E, G * N, G * N, H))),
            ("conv1d.weight", Sliced(conv)), ("conv1d.bias", Sliced(conv)),
            ("conv1d.in_channels", LocalSize()), ("conv1d.out_channels", LocalSize()),
            ("conv1d.groups", LocalSize()),
            ("dt_bias", Sliced()), ("A_log", Sliced()), ("D_skip", Sliced()),
            ("norm.weight", Sliced()), ("norm.dim", LocalSize()),
            ("out_proj", Row()),
            ("d_inner", LocalSize()), ("n_heads", LocalSize()), ("n_groups", LocalSize()),
            ("conv_dim", LocalSize())]


def _mixer_plan(mixer: nn.Module) -> Plan:
    # most specific type first: a SessaMixer is also an AttentionMixer
    for kind, plan in ((SessaMixer, _sessa_plan), (AttentionMixer, _attention_plan),
                       (Mamba2Mixer, _mamba2_plan)):
        if isinstance(mixer, kind):
            return plan(mixer)
    raise TypeError(f"no tensor-parallel plan for the mixer {type(mixer).__name__}")


def _prefixed(prefix: str, plan: Plan) -> Plan:
    return [(f"{prefix}.{path}", rule) for path, rule in plan]


def _gated_block_plan(block: GatedBlock) -> Plan:
    plan = [("ln", Replicated()), ("W_in", GatedInProj())]
    plan += _prefixed("mixer", _mixer_plan(block.mixer))
    if not isinstance(block.mixer, SessaMixer):     # Sessa cuts its channels before the solve
        plan.append(("mixer_out_to_local", Hook(ScatterToChannels)))
    return plan + [("W_out", Row())]


def _transformer_block_plan(block: TransformerBlock) -> Plan:
    return ([("ln1", Replicated()), ("ln2", Replicated())]
            + _prefixed("attn", _attention_plan(block.attn))
            + [("mlp.w_gate", Column()), ("mlp.w_up", Column()), ("mlp.w_down", Row())])


_STAGE_PLANS: tuple[tuple[type[nn.Module], Callable[[nn.Module], Plan]], ...] = (
    (TokenEmbedding, lambda stage: [("", VocabParallel())]),
    (LMHead, lambda stage: [("", VocabParallel())]),
    (GatedBlock, _gated_block_plan),
    (TransformerBlock, _transformer_block_plan),
)


def tp_plan(stage: nn.Module) -> Plan:
    """The plan of one model stage: (attribute path, rule) pairs, applied in order. Calls the
    TP group's size (the Mamba2 plan checks its groups divide it)."""
    for kind, plan in _STAGE_PLANS:
        if isinstance(stage, kind):
            return plan(stage)
    raise TypeError(f"no tensor-parallel plan for {type(stage).__name__}")


def apply_tensor_parallel(stage: nn.Module, config) -> nn.Module:
    """Carry out ``tp_plan(stage)`` on one model stage (embedding, block or head), in place for
    blocks; returns the converted stage."""
    for path, rule in tp_plan(stage):
        if isinstance(rule, VocabParallel):
            if isinstance(stage, TokenEmbedding):
                return VocabEmbedding(stage, config)
            return VocabParallelHead(stage, config)
        owner_path, _, name = path.rpartition(".")
        owner = stage.get_submodule(owner_path) if owner_path else stage
        rule.apply(owner, name, config)
    return stage


def plain_state_dict(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of the plain (un-sharded) module this one was converted from. Collective
    over the TP group: every TP rank must call it."""
    if hasattr(module, "plain_state"):
        return {prefix + k: v for k, v in module.plain_state().items()}
    out = {}
    for k, v in (list(module.named_parameters(recurse=False))
                 + list(module.named_buffers(recurse=False))):
        if v is None:
            continue
        how = getattr(v, "_tp_slice", None)
        out[prefix + k] = how.gather(v) if how is not None else v.detach().clone()
    for name, child in module.named_children():
        out.update(plain_state_dict(child, f"{prefix}{name}."))
    return out
