"""The ablation "Sessa without its feedback branch" (``model.sessa.feedback: false``): the mixer
output is the forward branch alone, the feedback parameters do not exist, and decoding with a
cache equals the parallel forward."""

from __future__ import annotations

import torch

from sessa_pt.config import load_config
from sessa_pt.models import SessaBlock, SessaMixer
from sessa_pt.models.attention import AttentionMixer
from sessa_pt.models.config import ModelConfig
from sessa_pt.models.lm import DecoderLM

F64 = torch.float64


def test_output_is_the_forward_branch_and_differs_from_full_sessa():
    torch.manual_seed(0)
    full = SessaMixer(16, 4).double()
    ablated = SessaMixer(16, 4, feedback=False).double()
    ablated.load_state_dict(full.state_dict(), strict=False)
    a = torch.randn(2, 9, 16, dtype=F64)
    assert torch.allclose(ablated(a), AttentionMixer.forward(full, a), atol=1e-12)
    assert not torch.allclose(ablated(a), full(a), atol=1e-3)


def test_feedback_parameters_are_not_created():
    D, L = 32, 3
    on = DecoderLM(ModelConfig(vocab_size=64, d_model=D, n_layers=L, n_heads=4))
    off_cfg = ModelConfig(vocab_size=64, d_model=D, n_layers=L, n_heads=4)
    off_cfg.sessa.feedback = False
    off = DecoderLM(off_cfg)
    feedback_params = 2 * D * D + 2 * D + D + 1          # proj_fb, gamma_ctx, gamma_bias
    assert on.num_params()["non_embedding"] - off.num_params()["non_embedding"] == \
        L * feedback_params
    names = {n for n, _ in off.named_parameters()}
    assert not any(k in n for n in names for k in ("proj_fb", "gamma_ctx", "gamma_bias"))
    assert off.flops_per_token(128) < on.flops_per_token(128)


def test_prefill_and_decode_equal_parallel_forward():
    torch.manual_seed(5)
    block = SessaBlock(16, 4, None, feedback=False).double()
    x = torch.randn(2, 13, 16, dtype=F64)
    full = block(x)
    cache = block.init_cache()
    parts = [block(x[:, :5], cache)]
    parts += [block(x[:, t:t + 1], cache) for t in range(5, 9)]
    parts.append(block(x[:, 9:], cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10, rtol=0)
    assert "s" not in cache.extra


def test_recipe_switch_reaches_the_model():
    cfg = load_config("recipes/tiny/sessa.yaml", ["model.sessa.feedback=false",
                                                  "model.sessa.impl=chunked"])
    assert cfg.model.sessa.feedback is False
    lm = DecoderLM(cfg.model)
    assert all(not b.mixer.feedback for b in lm.blocks)
