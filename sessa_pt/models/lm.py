"""The decoder language model: token embedding, a stack of blocks, final norm, LM head, loss.

Plain PyTorch, no parallelism here: ``sessa_pt.parallel`` wraps or re-expresses these modules
for tensor and pipeline parallelism. The model is split into three kinds of stages so a pipeline
can place them: ``TokenEmbedding``, the blocks, and ``LMHead`` (final norm + projection, tied to
the embedding by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sessa_kernels.precision import accumulation_dtype
from torch import Tensor, nn

from sessa_pt.models.attention import AttentionMixer
from sessa_pt.models.blocks import GatedBlock, TransformerBlock
from sessa_pt.models.config import ModelConfig
from sessa_pt.models.sessa import SessaMixer


def build_mixer(cfg: ModelConfig, kind: str) -> nn.Module:
    if kind == "sessa":
        o = cfg.sessa
        return SessaMixer(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, variant=o.variant,
                          gamma_max=o.gamma_max, gamma_bias_init=o.gamma_bias_init,
                          fb_dim=o.fb_dim, impl=o.impl, chunk_size=o.chunk_size,
                          solve=o.solve, panel_mib=o.panel_mib, feedback=o.feedback,
                          use_rope=cfg.use_rope, rope_base=cfg.rope_base)
    if kind == "attention":
        return AttentionMixer(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, use_rope=cfg.use_rope,
                              rope_base=cfg.rope_base)
    if kind == "mamba2":
        from sessa_pt.models.mamba2 import Mamba2Mixer

        o = cfg.mamba2
        return Mamba2Mixer(cfg.d_model, d_state=o.d_state, d_conv=o.d_conv, expand=o.expand,
                           head_dim=o.head_dim, n_groups=o.n_groups, chunk_size=o.chunk_size,
                           impl=o.impl, conv_impl=o.conv_impl)
    raise ValueError(f"unknown mixer {kind!r}")


def build_block(cfg: ModelConfig, layer: int) -> nn.Module:
    mixer = build_mixer(cfg, cfg.mixers()[layer])
    if cfg.block == "transformer":
        return TransformerBlock(cfg.d_model, mixer, cfg.mlp_hidden)
    return GatedBlock(cfg.d_model, mixer)


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Final LayerNorm and the projection to the vocabulary (``weight`` None = tied)."""

    def __init__(self, d_model: int, vocab_size: int, tied: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=1e-5)
        self.weight = None if tied else nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, h: Tensor, embedding_weight: Tensor | None = None) -> Tensor:
        w = self.weight if self.weight is not None else embedding_weight
        return F.linear(self.norm(h), w)


def masked_loss_sum(per_token: Tensor, loss_mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """(sum of the per-token losses at the positions ``loss_mask`` keeps, number kept).

    The one masked reduction of the LM loss: every loss here (plain, fused-chunked,
    vocab-parallel, evaluation) supplies per-token losses or their sum and reduces through
    this, so sums and counts can be added over micro-batches or ranks before dividing (a
    token-weighted mean). No mask keeps every position."""
    per_token = per_token.flatten()
    w = token_weights(per_token, loss_mask).to(per_token.dtype)
    return (per_token * w).sum(), w.sum()


def token_weights(per_token: Tensor, loss_mask: Tensor | None) -> Tensor:
    """The mask as float32 weights, one per position of ``per_token`` (all ones for None)."""
    if loss_mask is None:
        return torch.ones(per_token.numel(), device=per_token.device, dtype=torch.float32)
    if loss_mask.numel() != per_token.numel():
        raise ValueError(f"loss_mask has {loss_mask.numel()} positions but there are "
                         f"{per_token.numel()} per-token losses: pass the batch's own mask")
    return loss_mask.flatten().float()


def mean_loss(total: Tensor, count: Tensor) -> Tensor:
    """``total / count``, 0 where nothing was kept (count 0)."""
    return total / count.clamp_min(1.0)


def lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross entropy over the positions the mask keeps (fp32)."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return mean_loss(*masked_loss_sum(ce, loss_mask))


class _FusedLinearCE(torch.autograd.Function):
    """sum_i w_i CE(h_i W^T, y_i), chunk by chunk, with the gradients made in the forward.

    Per chunk of rows: logits = h_c W^T (the input dtype: tensor cores under bf16), the loss and
    its logit gradient in one in-place pass (``sessa_kernels.ce_triton``), then dh_c = g W and
    dW += g^T h_c (each chunk's product in the input dtype, the running sum in float32). The
    backward only scales them by the incoming gradient: the matmul work is the unfused loss's
    (no recomputation), and one chunk of logits is alive at a time.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, weights, chunk_tokens):
        from sessa_kernels.ce_triton import cross_entropy_grad_

        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, device=weight.device, dtype=accumulation_dtype(weight))
        total = h.new_zeros((), dtype=dw.dtype)
        for i in range(0, h.shape[0], chunk_tokens):
            hc = h[i:i + chunk_tokens]
            logits = F.linear(hc, weight)
            total = total + cross_entropy_grad_(logits, labels[i:i + chunk_tokens],
                                                weights[i:i + chunk_tokens])
            g = logits.to(hc.dtype) if logits.dtype != hc.dtype else logits
            dh[i:i + chunk_tokens] = g @ weight.to(g.dtype)
            dw += (g.t() @ hc.to(g.dtype)).to(dw.dtype)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (dh * grad_total.to(dh.dtype), (dw * grad_total).to(ctx.weight_dtype), None,
                None, None)


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """The next token (B, 1) from last-position logits (B, V): argmax at temperature 0, else a
    draw from softmax(logits / temperature) kept to the top-k tokens and the top-p nucleus (the
    most likely token always stays)."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def chunked_lm_loss(h: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor | None = None,
                    chunk_tokens: int = 8192) -> Tensor:
    """``lm_loss(F.linear(h, weight), labels, loss_mask)`` without holding all logits: a fused
    linear + cross-entropy over ``chunk_tokens`` positions at a time (:class:`_FusedLinearCE`).
    With a 32k vocabulary the fp32 logits of 128k tokens alone are 17 GB; this keeps one
    chunk's logits (in the activation dtype), plus dh and a float32 dW until the backward."""
    return mean_loss(*chunked_lm_loss_sum(h, weight, labels, loss_mask, chunk_tokens))


def chunked_lm_loss_sum(h: Tensor, weight: Tensor, labels: Tensor,
                        loss_mask: Tensor | None = None, chunk_tokens: int = 8192
                        ) -> tuple[Tensor, Tensor]:
    """The fused loss as :func:`masked_loss_sum` gives it: (masked CE sum, tokens kept)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h2, y = h.flatten(0, -2), labels.flatten()
    # The fused kernel forms sum_i w_i CE_i itself (it never has the per-token losses), with
    # the mask as the row weights; the count is the mask's, as in masked_loss_sum.
    w = token_weights(y, loss_mask)
    total = _FusedLinearCE.apply(h2, weight, y, w, chunk_tokens)      # float32 (float64)
    return total, w.sum().to(total.dtype)


def lm_forward(embed: Callable[[Tensor], Tensor], blocks, head: nn.Module, input_ids: Tensor,
               labels: Tensor | None = None, loss_mask: Tensor | None = None, *,
               embedding: nn.Module, loss_fn=lm_loss, loss_chunk_tokens: int = 0,
               caches: list | None = None) -> Tensor:
    """The model forward every non-pipeline path runs (:class:`DecoderLM`, and
    ``sessa_pt.parallel.model.SequentialLM`` over its TP / compiled / checkpointed stages):
    ``embed``, the blocks in order (each with its decoding cache when ``caches`` is given),
    then :func:`head_output`. ``embedding`` is the module holding the embedding ``weight``
    (the tied head's projection)."""
    h = embed(input_ids)
    for i, block in enumerate(blocks):
        h = block(h) if caches is None else block(h, caches[i])
    return head_output(head, h, labels, loss_mask, embedding=embedding, loss_fn=loss_fn,
                       loss_chunk_tokens=loss_chunk_tokens)


def head_output(head: nn.Module, h: Tensor, labels: Tensor | None = None,
                loss_mask: Tensor | None = None, *, embedding: nn.Module, loss_fn=lm_loss,
                loss_chunk_tokens: int = 0) -> Tensor:
    """The head (an :class:`LMHead` or its tensor-parallel form) on the last hidden states:
    logits without ``labels``; else ``loss_fn(logits, labels, loss_mask)``, or with
    ``loss_chunk_tokens > 0`` the fused :func:`chunked_lm_loss` that never holds all logits.
    A tied head (``head.weight`` None) projects with ``embedding.weight``."""
    # Read the embedding weight here, not before the embedding ran: under ZeRO-3 that access
    # is what gathers the (partitioned, released after the embedding's forward) parameter.
    if labels is None:
        return head(h, embedding.weight)
    if loss_chunk_tokens:
        weight = head.weight if head.weight is not None else embedding.weight
        return chunked_lm_loss(head.norm(h), weight, labels, loss_mask, loss_chunk_tokens)
    return loss_fn(head(h, embedding.weight), labels, loss_mask)


def build_stage(cfg: ModelConfig, index: int, seed: int = 0) -> nn.Module:
    """Stage ``index`` of the model (0: embedding, 1..n_layers: blocks, n_layers+1: head),
    built and initialised under its own seed, so that any split of the stages over pipeline
    stages or tensor-parallel ranks starts from the same weights as the single-process model."""
    L = cfg.n_layers
    if not 0 <= index <= L + 1:
        raise IndexError(f"stage {index} out of range 0..{L + 1}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + index)
        if index == 0:
            module = TokenEmbedding(cfg.vocab_size, cfg.d_model)
        elif index <= L:
            module = build_block(cfg, index - 1)
        else:
            module = LMHead(cfg.d_model, cfg.vocab_size, tied=cfg.tie_embeddings)
        init_lm_weights(module, cfg)
    return module


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.seed = seed
        L = cfg.n_layers
        self.embed = build_stage(cfg, 0, seed)
        self.blocks = nn.ModuleList(build_stage(cfg, i + 1, seed) for i in range(L))
        self.head = build_stage(cfg, L + 1, seed)
        self.loss_fn = lm_loss     # tensor parallelism swaps in a vocab-parallel loss
        self.loss_chunk_tokens = 0  # > 0: chunked_lm_loss, never all logits at once

    # ---- initialisation -------------------------------------------------------------------
    def init_weights(self) -> None:
        """Re-initialise every stage exactly as construction did."""
        fresh = DecoderLM(self.cfg, self.seed)
        self.load_state_dict(fresh.state_dict())

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                loss_mask: Tensor | None = None, caches: list | None = None) -> Tensor:
        """Logits (B, T, V); or the loss when ``labels`` are given."""
        return lm_forward(self.embed, self.blocks, self.head, input_ids, labels, loss_mask,
                          embedding=self.embed, loss_fn=self.loss_fn,
                          loss_chunk_tokens=self.loss_chunk_tokens, caches=caches)

    def init_caches(self) -> list:
        return [b.init_cache() for b in self.blocks]

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 eos_id: int | None = None, vocab_limit: int | None = None,
                 on_token: Callable[[int, Tensor], bool | None] | None = None) -> Tensor:
        """Decode with the recurrent caches: prefill, then one token per step.

        ``temperature`` 0 is greedy; otherwise tokens are sampled from the logits / temperature,
        restricted to the ``top_k`` most likely (0: all) and to the smallest set whose
        probability reaches ``top_p`` (1: all), drawing from ``generator`` (the same seed gives
        the same tokens). With ``eos_id`` a row that produced it keeps producing it and decoding
        stops once every row has. ``vocab_limit``: only ids below it are produced (the rows of
        a vocabulary padded past the tokenizer's are not tokens). ``on_token(step, tokens)``
        sees each new (B, 1) column as it is made (streaming); returning True stops decoding
        there. Returns the new tokens (B, n <= max_new_tokens).
        """
        caches = self.init_caches()
        logits = self(input_ids, caches=caches)
        out: list[Tensor] = []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :vocab_limit], temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done.unsqueeze(1), torch.full_like(nxt, eos_id), nxt)
                done |= nxt.squeeze(1) == eos_id
            out.append(nxt)
            if on_token is not None and on_token(step, nxt):
                break
            if eos_id is not None and bool(done.all()):
                break
            if step + 1 < max_new_tokens:
                logits = self(nxt, caches=caches)
        return torch.cat(out, dim=1) if out else input_ids[:, :0]

    # ---- accounting -----------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Total parameters and non-embedding parameters (without embedding and untied head)."""
        total = sum(p.numel() for p in self.parameters())
        emb = self.embed.weight.numel()
        if self.head.weight is not None:
            emb += self.head.weight.numel()
        return {"total": total, "non_embedding": total - emb}

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add; attention T^2 terms unmasked). Training
        costs 3x this (forward + backward)."""
        D, V = self.cfg.d_model, self.cfg.vocab_size
        return sum(b.flops_per_token(seq_len) for b in self.blocks) + 2.0 * D * V


def norm_types() -> tuple[type[nn.Module], ...]:
    """The normalisation modules of our models (their parameters keep their ones / zeros
    init and are never weight-decayed by shape alone)."""
    from sessa_pt.models.mamba2 import GatedRMSNorm

    return (nn.LayerNorm, nn.RMSNorm, GatedRMSNorm)


def init_lm_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for linear and embedding weights, zero biases, residual output
    projections scaled by 1/sqrt(2 n_layers) (GPT-2). Norm modules (:func:`norm_types`) keep
    their init, and so do parameters flagged ``_no_reinit`` (Sessa's gain, Mamba2's
    decay/step/skip and conv)."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    residual_out = ("W_out", "out_proj", "w_down")
    norms = norm_types()
    seen: set[int] = set()
    with torch.no_grad():
        # named_modules then each module's own parameters: the order of named_parameters(), so
        # the random draws (and the initial weights) follow the parameters' order.
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(module, norms) or getattr(p, "_no_reinit", False) or p.dim() == 0:
                    continue
                if p.dim() >= 2:
                    last = module_name.rsplit(".", 1)[-1]
                    p.normal_(0.0, out_std if last in residual_out else std)
                elif name == "bias":
                    p.zero_()
