"""The DeepSpeed engine: data parallelism and ZeRO around the (TP / PP) model.

The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer: DeepSpeed's own
FusedAdam is JIT-compiled, which costs ~50 s on CPU and fails on the GPU image (its
TORCH_CUDA_ARCH_LIST=9.0a cannot be parsed by DeepSpeed's op builder: "invalid literal for int()
with base 10: '0a'").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sessa_pt.config import Config, resolve_precision


def deepspeed_config(cfg: Config, dp: int, cuda: bool) -> dict:
    t, p = cfg.train, cfg.parallel
    bf16 = resolve_precision(cfg, cuda) == "bf16"
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        # DeepSpeed's default is 1.0, not "off": always set it explicitly (stack.md).
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        # check_grad_overflow (on by default for bf16) makes ZeRO-1/2 test every gradient with
        # its own amax and amin, serially (~6 kernel launches per parameter and a host sync,
        # a third of the CPU time of a Sessa m125 step), and skip the step on its own. Non-finite
        # steps are GuardedAdamW's (train.nonfinite), the same in fp32 and bf16.
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.zero_stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = \
            p.zero3_persistence_threshold
    if bf16 and p.pp > 1:
        ds["data_types"] = {"grad_accum_dtype": p.grad_accum_dtype}
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, projections: ``p.dim() >= 2``), none on vectors
    and scalars (biases, norm gains, Sessa's gain bias) or on parameters flagged
    ``_no_weight_decay`` (Mamba2's step, decay and skip), as nanoGPT groups them. By shape, not
    by name, so a tensor-parallel slice or a renamed module is grouped like the plain one."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": aligned_order(decay), "weight_decay": weight_decay},
            {"params": aligned_order(no_decay), "weight_decay": 0.0}]


# DeepSpeed's ZeRO-1/2 and bf16 optimizers pack each param group into one flat buffer and make
# every parameter a view of it at the running offset (stage_1_and_2._update_model_bit16_weights,
# bf16_optimizer._update_storage_to_flattened_tensor), with no padding between parameters by
# default. One parameter whose size is not a multiple of 8 bf16 elements (Sessa's 1-element
# gamma_bias, Mamba2's per-head dt_bias / A_log / D_skip) shifts every later one off 16-byte
# alignment: cuBLAS then falls back to its alignment-1 kernels (a 12.5% slice of the Sessa
# step) or, under inductor, fails with "misaligned address" (Mamba2 m125, train.compile=true).
ALIGN_ELEMENTS = 8


def aligned_order(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` with those of a size that is a multiple of ALIGN_ELEMENTS first (in model
    order), the rest after them: packed in this order, every parameter of the first kind
    starts 16-byte aligned. The order changes no numerics of AdamW."""
    return ([p for p in params if p.numel() % ALIGN_ELEMENTS == 0]
            + [p for p in params if p.numel() % ALIGN_ELEMENTS])


def misaligned_parameters(model: nn.Module) -> list[str]:
    """Names of parameters whose size is a multiple of ALIGN_ELEMENTS but whose storage does
    not start on a 16-byte boundary (ZeRO-3's gathered parameters are not checked)."""
    return [n for n, p in model.named_parameters()
            if p.numel() and p.numel() % ALIGN_ELEMENTS == 0
            and not hasattr(p, "ds_id") and p.data_ptr() % 16]


def lr_lambda(cfg: Config):
    """Multiplier of optim.lr at optimizer step s (0-based): linear warmup, then cosine to
    min_lr, or WSD (constant, then a linear decay over the last decay_fraction of steps)."""
    o, total = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0
    warm = max(0, o.warmup_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total - round(o.decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress

    return f


def build_engine(model: nn.Module, cfg: Config, dp: int, cuda: bool, mpu=None,
                 optimizer_class: type[torch.optim.AdamW] = torch.optim.AdamW):
    import deepspeed

    o = cfg.optim
    optimizer = optimizer_class(param_groups(model, o.weight_decay), lr=o.lr,
                                  betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=True if o.fused else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dp, cuda), mpu=mpu)
    bad = misaligned_parameters(model)
    if bad:
        raise RuntimeError(
            f"{len(bad)} parameters start off a 16-byte boundary after DeepSpeed packed them "
            f"(first: {bad[0]}); cuBLAS would run its slow alignment-1 kernels and compiled "
            "GEMMs can fault. sessa_pt.parallel.engine.aligned_order should prevent this: "
            "report the model and layout")
    return engine
