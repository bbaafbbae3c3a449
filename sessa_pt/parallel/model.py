"""The model as this rank runs it: plain stages (embedding, blocks, head) built under their own
seeds, converted by the TP plan when tp > 1, and assembled either as one sequential module
(pp == 1) or as a DeepSpeed ``PipelineModule`` (pp > 1, with the embedding tied to the head
through ``TiedLayerSpec``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sessa_pt.models.config import ModelConfig
from sessa_pt.models.lm import build_stage, lm_forward, lm_loss
from sessa_pt.models.rope import build_tables, rotary_specs
from sessa_pt.parallel.tensor_parallel import (
    apply_tensor_parallel,
    megatron_config,
    vocab_logits,
    vocab_parallel_lm_loss,
)
from sessa_pt.parallel.topology import ParallelLayout


def plain_prefix(cfg: ModelConfig, index: int) -> str:
    if index == 0:
        return "embed."
    if index <= cfg.n_layers:
        return f"blocks.{index - 1}."
    return "head."


class Stage(nn.Module):
    """One model stage (``m``), with the name it has in the plain DecoderLM."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int, tp: int, pp: int,
                 compile_blocks: bool = False, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        module = build_stage(cfg, index, seed)
        if tp > 1:
            module = apply_tensor_parallel(module, megatron_config(tp, pp))
        self.m = module
        self.plain_prefix = plain_prefix(cfg, index)
        is_block = 0 < index <= cfg.n_layers
        # The compiled wrapper is kept out of the module tree (object.__setattr__), so parameter
        # names and the state dict stay those of self.m; calling the wrapper still runs the
        # module's hooks (which ZeRO-3 relies on to gather parameters).
        self._compiled = None
        if compile_blocks and is_block:
            object.__setattr__(self, "_compiled", torch.compile(module))
        self.checkpoint = checkpoint_blocks and is_block
        self._rotary = rotary_specs(module) if self._compiled is not None else []

    def forward(self, x: Tensor) -> Tensor:
        run = self.m if self._compiled is None else self._compiled
        build_tables(self._rotary, x)       # outside the compiled graph (models/rope.py)
        if self.checkpoint and torch.is_grad_enabled():
            # Activation checkpointing: keep only the block's input; the backward reruns the
            # (compiled) block. Non-reentrant, so it composes with torch.compile, TP
            # communication inside the block and DeepSpeed's pipeline engine (which calls
            # torch.autograd.backward on the stage outputs). DeepSpeed's own
            # activation_checkpoint_interval is not used: it is reentrant and would wrap the
            # embedding and head stages too.
            return checkpoint(run, x, use_reentrant=False)
        return run(x)


class HeadStage(Stage):
    """The final norm + an untied projection, or (tied) only the norm: the tied embedding layer
    that follows computes the logits."""

    def forward(self, h: Tensor) -> Tensor:
        if self.m.weight is None:
            return self.m.norm(h)
        return self.m(h)


def loss_function(tp: int):
    return vocab_parallel_lm_loss if tp > 1 else lm_loss


class SequentialLM(nn.Module):
    """All stages on this rank (pp == 1): forward(input_ids, labels, loss_mask) -> loss."""

    def __init__(self, cfg: ModelConfig, seed: int, layout: ParallelLayout,
                 compile_blocks: bool = False, loss_chunk_tokens: int = 0,
                 checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens
        n = cfg.n_layers + 2
        self.stages = nn.ModuleList(Stage(cfg, i, seed, layout.tp, 1, compile_blocks,
                                          checkpoint_blocks) for i in range(n))
        self.loss_fn = loss_function(layout.tp)
        if compile_blocks and layout.tp == 1:
            # One fused kernel for the fp32 cast, log-softmax and masked mean: eager mode makes
            # an fp32 copy of all logits (17 GB at 128k tokens x 32k vocabulary) and re-reads it.
            self.loss_fn = torch.compile(self.loss_fn)

    def _forward(self, input_ids: Tensor, labels: Tensor | None, loss_mask: Tensor | None
                 ) -> Tensor:
        embed = self.stages[0]
        return lm_forward(embed, self.stages[1:-1], self.stages[-1].m, input_ids, labels,
                          loss_mask, embedding=embed.m, loss_fn=self.loss_fn,
                          loss_chunk_tokens=self.loss_chunk_tokens)   # chunked: tp == 1 only

    def logits(self, input_ids: Tensor) -> Tensor:
        return self._forward(input_ids, None, None)

    def forward(self, input_ids: Tensor, labels: Tensor, loss_mask: Tensor | None = None
                ) -> Tensor:
        return self._forward(input_ids, labels, loss_mask)


def _tied_logits(embedding: Stage, h: Tensor) -> Tensor:
    """The tied head's projection (``h`` already normed by the head stage) in the embedding's
    pipeline layer: the same projection as the head modules' (:func:`vocab_logits`)."""
    return vocab_logits(h, embedding.m.weight)


def build_pipeline(cfg: ModelConfig, seed: int, layout: ParallelLayout, topology,
                   compile_blocks: bool = False, checkpoint_blocks: bool = False):
    """DeepSpeed PipelineModule over [embedding, blocks..., head]; layers are partitioned
    uniformly by parameter count-free index ranges (one block each, embedding/head extra).
    Blocks are compiled and / or activation-checkpointed per block as in ``SequentialLM``."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    L, tp, pp = cfg.n_layers, layout.tp, layout.pp
    loss_fn = loss_function(tp)
    layers = []
    if cfg.tie_embeddings:
        layers.append(TiedLayerSpec("embed", Stage, cfg, 0, seed, tp, pp,
                                    tied_weight_attr="m.weight"))
    else:
        layers.append(LayerSpec(Stage, cfg, 0, seed, tp, pp))
    layers += [LayerSpec(Stage, cfg, i, seed, tp, pp, compile_blocks, checkpoint_blocks)
               for i in range(1, L + 1)]
    layers.append(LayerSpec(HeadStage, cfg, L + 1, seed, tp, pp))
    if cfg.tie_embeddings:
        layers.append(TiedLayerSpec("embed", Stage, cfg, 0, seed, tp, pp,
                                    forward_fn=_tied_logits, tied_weight_attr="m.weight"))

    def pipe_loss(logits: Tensor, target) -> Tensor:
        # (labels, loss_mask) in training: the mean loss of the micro-batch. Validation adds
        # the micro-batch's target-token count, which turns the mean into a sum, so that the
        # trainer can divide the pipeline's total by the number of target tokens (an
        # all-padding micro-batch then adds nothing instead of a 0 that counts in a mean).
        labels, loss_mask = target[0], target[1]
        loss = loss_fn(logits, labels, loss_mask)
        return loss * target[2] if len(target) > 2 else loss

    return PipelineModule(layers=layers, loss_fn=pipe_loss, topology=topology,
                          partition_method="type:Stage", activation_checkpoint_interval=0)


def stage_modules(model: nn.Module) -> list[Stage]:
    return [m for m in model.modules() if isinstance(m, Stage)]
