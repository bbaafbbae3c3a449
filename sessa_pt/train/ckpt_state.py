"""The layout-free training state: model weights and Adam moments as full-shape tensors keyed by
the plain DecoderLM's parameter names, so a checkpoint loads on any tp / pp / dp / ZeRO stage.

Why our own format rather than DeepSpeed's universal checkpoint. DeepSpeed's native checkpoint
is one file per (TP, PP) rank for the model and one per ZeRO shard for the optimizer, so it is
tied to the layout. Its universal conversion (``deepspeed/checkpoint/ds_to_universal.py``) is an
offline pass: one process loads every ZeRO shard, merges the flat fp32 partitions back into
per-parameter tensors and then needs, per parameter, how TP slices it (a
``universal_checkpoint_info`` with regex patterns for replicated, row- and column-parallel and
"sub-params"); loading (``universal_checkpoint.py``) slices those again. That does not fit our
TP plan without a second copy of it: Mamba2's in_proj is column-parallel section by section
([z | x | B | C | dt] each split), the gated block's W_in is half replicated, half
column-parallel, and the Sessa channel slice lives in the solve. It also costs a full extra
pass over the checkpoint on one process before every layout change. Here the plan itself does
the conversion: saving swaps each live parameter's data for the tensor to export (fp32 master,
exp_avg, exp_avg_sq) and calls the plan's ``plain_state_dict`` (which undoes the TP slicing,
sections included); loading builds the plain stage, loads the tensors into it and converts it
with ``apply_tensor_parallel``, exactly as a fresh run builds its model. One code path, no
slicing metadata to keep in sync.

Who writes what (saving cost does not grow with the world size on rank 0). Within each
pipeline stage, model stage k (embedding, block, head) is owned by data-parallel index
``k % dp``; its fp32 master and moments are gathered (ZeRO-1/2: reduced fragments; ZeRO-3:
gathered partitions) to the owner only, the owner's TP group undoes the TP slicing, and the
plain tensors are written by TP rank ``j % tp`` (j: the tensor's index). Every rank then writes
one model and one optimizer file with its share; no rank ever holds the whole model.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sessa_pt.parallel.model import stage_modules
from sessa_pt.parallel.tensor_parallel import (
    apply_tensor_parallel,
    megatron_config,
    plain_state_dict,
)

MOMENTS = ("exp_avg", "exp_avg_sq")


def base_optimizer(engine) -> torch.optim.Optimizer:
    """torch's AdamW (DeepSpeed's ZeRO and bf16 wrappers hold it as ``.optimizer``)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _flat_master_tensors(engine) -> list[Tensor]:
    """The tensors torch's AdamW keeps state for (ZeRO-3 swaps its param groups per sub-group
    during a step, so its own list of flat fp32 partitions is also consulted)."""
    wrapper, base = engine.optimizer, base_optimizer(engine)
    out = [p for g in base.param_groups for p in g["params"]]
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        out += list(getattr(wrapper, attr, None) or [])
    seen, unique = set(), []
    for p in out:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def ensure_optimizer_state(engine) -> None:
    """Create AdamW's state as its first step would (step 0, zero moments) where it does not
    exist yet, and let DeepSpeed link its per-parameter views of it (it does that lazily after
    the first step). A run that then steps is identical to one that never had this."""
    base = base_optimizer(engine)
    group_of = {id(p): g for g in base.param_groups for p in g["params"]}
    default = base.param_groups[0]
    for p in _flat_master_tensors(engine):
        st = base.state[p]
        if len(st) == 0:
            g = group_of.get(id(p), default)
            on_device = g.get("fused") or g.get("capturable")
            st["step"] = torch.zeros((), dtype=torch.float32,
                                     device=p.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # DeepSpeed links each parameter's view of the moments once, right after the first
    # optimizer step of param group 0 (stage_1_and_2._optimizer_step steps one group at a time,
    # then links every group): group 1 (our no-weight-decay group) has no state yet then, so its
    # parameters get empty views for good. Relink now that every group's state exists.
    wrapper = engine.optimizer
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def optimizer_step(engine) -> int:
    steps = {int(st["step"]) for st in base_optimizer(engine).state.values() if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW parameter states disagree on their step count: {steps}")
    return steps.pop() if steps else 0


def set_optimizer_step(engine, step: int) -> None:
    for st in base_optimizer(engine).state.values():
        st["step"].fill_(float(step))


def zero3_partitioned(engine) -> int:
    """How many of this rank's parameters ZeRO-3 holds only a partition of."""
    return sum(1 for p in engine.module.parameters()
               if hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel)


# ---- one live parameter's fp32 tensors (this rank's TP slice, whole over DP) ---------------

def _kind(p: Tensor, engine) -> str:
    if hasattr(p, "ds_id"):
        return "zero3"
    if hasattr(p, "_hp_mapping"):
        return "fragments"          # ZeRO-1/2 and DeepSpeed's bf16 optimizer
    if hasattr(engine.optimizer, "fp32_groups_flat") or hasattr(engine.optimizer, "fp32_groups"):
        return "flat"               # ZeRO-0 bf16: DeepSpeed's fp16/bf16 optimizers
    return "plain"                  # torch's AdamW on the parameter itself


def _flat_view(p: Tensor, key: str | None, engine) -> Tensor:
    """ZeRO-0 bf16 keeps whole fp32 masters: one per parameter (fp16/unfused_optimizer.py, the
    one used with torch's AdamW) or one per param group, its parameters flattened in order
    (fp16/fused_optimizer.py); this parameter's view of its master (or of an Adam moment)."""
    w = engine.optimizer
    state = base_optimizer(engine).state
    if not hasattr(w, "fp32_groups_flat"):
        for lp_group, hp_group in zip(w.fp16_groups, w.fp32_groups):
            for q, hp in zip(lp_group, hp_group):
                if q is p:
                    return hp if key is None else state[hp][key]
        raise KeyError(f"parameter of shape {tuple(p.shape)} is in no optimizer group")
    for i, group in enumerate(w.fp16_groups):
        offset = 0
        for q in group:
            if q is p:
                flat = w.fp32_groups_flat[i]
                src = flat if key is None else state[flat][key]
                return src.narrow(0, offset, p.numel()).view(p.shape)
            offset += q.numel()
    raise KeyError(f"parameter of shape {tuple(p.shape)} is in no optimizer group")


def _gather_to(p: Tensor, key: str | None, engine, group, owner: int) -> Tensor | None:
    """The fp32 master (key None) or an Adam moment of ``p``, whole, on global rank ``owner``
    of the data-parallel ``group`` (None on the other ranks). Collective over ``group``."""
    kind, me = _kind(p, engine), dist.get_rank()
    n = dist.get_world_size(group)
    if kind in ("plain", "flat"):          # whole on every rank
        if me != owner:
            return None
        if kind == "flat":
            t = _flat_view(p, key, engine)
        else:
            t = p.detach() if key is None else base_optimizer(engine).state[p][key]
        return t.float().clone()
    if kind == "zero3":
        part = p._z3_optimizer.get_local_fp32_param(p, key).detach().float().flatten()
        if n == 1:
            return part[:p.ds_numel].view(p.ds_shape).clone()
        parts = [torch.empty_like(part) for _ in range(n)] if me == owner else None
        dist.gather(part, parts, dst=owner, group=group)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape) if me == owner else None
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mapping = p._hp_mapping
    if mapping is not None:
        addr = mapping.lp_fragment_address
        buf.narrow(0, addr.start, addr.numel).copy_(mapping.get_hp_fragment(key).detach())
    if n > 1:
        dist.reduce(buf, dst=owner, group=group)        # each element lives on one rank only
    return buf.view(p.shape) if me == owner else None


def _set_local(p: Tensor, key: str | None, value: Tensor, engine) -> None:
    """Set this rank's part of the fp32 master (key None; also the model's own copy) or of an
    Adam moment of ``p`` from ``value``, the whole tensor of this rank's TP slice. Local."""
    kind = _kind(p, engine)
    if kind == "plain":
        target = p.data if key is None else base_optimizer(engine).state[p][key]
        target.copy_(value.view(target.shape))
        return
    if kind == "flat":
        _flat_view(p, key, engine).copy_(value.view(p.shape))
        if key is None:
            p.data.copy_(value.view(p.shape).to(p.dtype))
        return
    if kind == "zero3":
        part_numel = p.ds_tensor.numel()
        rank = p._z3_optimizer._get_param_partition_rank(p)
        flat = value.flatten().to(torch.float32)
        padded = torch.zeros(part_numel * (rank + 1), dtype=flat.dtype)
        n = min(flat.numel(), padded.numel())
        padded[:n] = flat[:n]
        mine = padded[part_numel * rank:]
        p._z3_optimizer.set_local_hp_param(mine.to(p.ds_tensor.device), p, key)
        if key is None:        # the partitioned model copy (what forward gathers)
            p.ds_tensor.data.copy_(mine.to(p.ds_tensor.dtype))
            if p.data.numel() == p.ds_numel:      # currently gathered (a persistent param)
                p.data.copy_(value.view(p.ds_shape).to(p.dtype))
        return
    mapping = p._hp_mapping
    if mapping is not None:
        addr = mapping.lp_fragment_address
        mapping.get_hp_fragment(key).data.copy_(
            value.flatten().narrow(0, addr.start, addr.numel).to(torch.float32))
    if key is None:
        p.data.copy_(value.view(p.shape).to(p.dtype))


# ---- stages ----------------------------------------------------------------------------------

def stage_index(prefix: str, n_layers: int) -> int:
    if prefix == "embed.":
        return 0
    if prefix == "head.":
        return n_layers + 1
    return int(prefix.split(".")[1]) + 1


def _written_stages(model: nn.Module, pp_rank: int) -> list:
    """This rank's stages whose tensors it exports (a tied embedding that a later pipeline stage
    holds again is exported by the first stage only)."""
    return [s for s in stage_modules(model) if not (s.plain_prefix == "embed." and pp_rank > 0)]


def _plain_view(stage, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The plain tensors that correspond to ``values`` (name -> tensor shaped like the stage's
    live parameter), through the TP plan. Collective over the TP group."""
    params = dict(stage.m.named_parameters())
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = values[n].to(saved[n].device if saved[n].numel() else values[n].device)
        return {k: v.detach().float().cpu().contiguous()
                for k, v in plain_state_dict(stage.m, stage.plain_prefix).items()}
    finally:
        for n, p in params.items():
            p.data = saved[n]


def collect(engine, layout) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model tensors, optimizer tensors) that THIS rank writes: plain names; optimizer keys are
    ``exp_avg.<name>`` / ``exp_avg_sq.<name>``. Collective over the whole world."""
    from megatron.core import parallel_state as ps

    ensure_optimizer_state(engine)
    dp_group = ps.get_data_parallel_group()
    model_out: dict[str, Tensor] = {}
    optim_out: dict[str, Tensor] = {}
    for k, stage in enumerate(_written_stages(engine.module, layout.pp_rank)):
        owner_dp = k % layout.dp
        owner = dist.get_global_rank(dp_group, owner_dp) if layout.dp > 1 else dist.get_rank()
        params = dict(stage.m.named_parameters())
        for key in (None, *MOMENTS):
            values = {n: _gather_to(p, key, engine, dp_group, owner) for n, p in params.items()}
            if layout.dp_rank != owner_dp:
                continue
            plain = _plain_view(stage, values)
            for j, (name, t) in enumerate(sorted(plain.items())):
                if j % layout.tp == layout.tp_rank:
                    if key is None:
                        model_out[name] = t
                    else:
                        optim_out[f"{key}.{name}"] = t
    return model_out, optim_out


def restore(engine, layout, model_cfg, seed: int, read) -> None:
    """Set this rank's model weights, fp32 masters and Adam moments from plain tensors;
    ``read(kind, names)`` returns {name: tensor} ("model" names or "optim" keys). Local."""
    ensure_optimizer_state(engine)
    from sessa_pt.models.lm import build_stage

    for stage in stage_modules(engine.module):
        index = stage_index(stage.plain_prefix, model_cfg.n_layers)
        plain_stage = build_stage(model_cfg, index, seed)
        names = list(dict(plain_stage.named_parameters()))
        full = [stage.plain_prefix + n for n in names]
        sources = {None: read("model", full)}
        optim = read("optim", [f"{m}.{n}" for m in MOMENTS for n in full])
        for m in MOMENTS:
            sources[m] = {n: optim[f"{m}.{n}"] for n in full}
        params = dict(stage.m.named_parameters())
        for key, tensors in sources.items():
            module = copy.deepcopy(plain_stage)
            module.load_state_dict({n: tensors[stage.plain_prefix + n] for n in names},
                                   strict=True)
            if layout.tp > 1:
                module = apply_tensor_parallel(module, megatron_config(layout.tp, layout.pp))
            local = dict(module.named_parameters())
            if local.keys() != params.keys():
                raise RuntimeError(f"stage {stage.plain_prefix!r}: the TP plan gives parameters "
                                   f"{sorted(local)} but the live stage has {sorted(params)}")
            with torch.no_grad():
                for n, p in params.items():
                    _set_local(p, key, local[n].detach(), engine)
