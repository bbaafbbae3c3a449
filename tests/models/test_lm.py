"""Attention baseline, blocks and the decoder LM: decoding, FLOPs and parameter accounting,
initialisation, and the rule that models never import the parallel stack."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sessa_pt.models import AttentionMixer, DecoderLM, ModelConfig, SessaBlock, TransformerBlock
from sessa_pt.models.blocks import GatedBlock
from sessa_pt.models.flops import measured_forward_flops

F64 = torch.float64
MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "sessa_pt" / "models"


@pytest.mark.parametrize("n_kv", [None, 2])
def test_attention_prefill_and_decode_equal_parallel_forward(n_kv):
    torch.manual_seed(0)
    block = GatedBlock(16, AttentionMixer(16, 4, n_kv)).double()
    x = torch.randn(2, 12, 16, dtype=F64)
    cache = block.init_cache()
    parts = [block(x[:, :4], cache)] + [block(x[:, t:t + 1], cache) for t in range(4, 8)]
    parts.append(block(x[:, 8:], cache))
    assert torch.allclose(torch.cat(parts, 1), block(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("mixer,block", [("sessa", "gated"), ("attention", "gated"),
                                         ("attention", "transformer")])
def test_lm_decoding_equals_parallel_logits(mixer, block):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, mixer=mixer, block=block)
    lm = DecoderLM(cfg).double()
    ids = torch.randint(0, 50, (2, 10))
    caches = lm.init_caches()
    steps = [lm(ids[:, :6], caches=caches)] + [lm(ids[:, t:t + 1], caches=caches)
                                                for t in range(6, 10)]
    assert torch.allclose(torch.cat(steps, 1), lm(ids), atol=1e-10, rtol=0)


def test_hybrid_layers_and_generate():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2,
                      layer_mixers=["sessa", "attention", "sessa"])
    lm = DecoderLM(cfg).double()
    assert [type(b.mixer).__name__ for b in lm.blocks] == ["SessaMixer", "AttentionMixer",
                                                           "SessaMixer"]
    ids = torch.randint(0, 40, (1, 5))
    out = lm.generate(ids, 4)
    seq = ids
    for _ in range(4):     # greedy without caches must agree
        seq = torch.cat([seq, lm(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq[:, 5:])


@pytest.mark.parametrize("T", [64, 256])
def test_flops_per_token_matches_flop_counter(T):
    torch.manual_seed(3)
    D = 64
    cases = {
        "attention mixer": (AttentionMixer(D, 4, 2), torch.randn(2, T, D)),
        "sessa block": (SessaBlock(D, 4), torch.randn(2, T, D)),
        "transformer block": (TransformerBlock(D, AttentionMixer(D, 4)), torch.randn(2, T, D)),
        "sessa lm": (DecoderLM(ModelConfig(vocab_size=300, d_model=D, n_layers=2, n_heads=4)),
                     torch.randint(0, 300, (2, T))),
        "transformer lm": (DecoderLM(ModelConfig(vocab_size=300, d_model=D, n_layers=2, n_heads=4,
                                                 mixer="attention", block="transformer",
                                                 tie_embeddings=False)),
                           torch.randint(0, 300, (2, T))),
    }
    for name, (module, x) in cases.items():
        measured = measured_forward_flops(module, x) / (2 * T)
        predicted = module.flops_per_token(T)
        assert abs(predicted / measured - 1) < 0.05, (name, predicted, measured)


def test_num_params():
    D, V, L = 32, 100, 3
    tied = DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4))
    n = tied.num_params()
    per_layer = (2 * D + 2 * D * D + 2 * D          # ln, W_in
                 + 3 * (D * D + D) + D * D          # q k v (+bias), out_proj
                 + 2 * D * D + 2 * D + D + 1        # proj_fb, gamma_ctx, gamma_bias
                 + D * D + D)                       # W_out
    assert n["non_embedding"] == L * per_layer + 2 * D   # + final norm
    assert n["total"] == n["non_embedding"] + V * D
    untied = DecoderLM(ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4,
                                   tie_embeddings=False)).num_params()
    assert untied["total"] == n["total"] + V * D and untied["non_embedding"] == n["non_embedding"]


def test_init_keeps_special_parameters():
    torch.manual_seed(4)
    lm = DecoderLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4))
    before = lm.blocks[0].mixer.gamma_ctx.weight.clone()
    lm.init_weights()
    m = lm.blocks[0].mixer
    assert m.gamma_bias.item() == 1.0 and m.gamma_bias.shape == (1,)
    assert torch.equal(m.gamma_ctx.weight, before)
    assert abs(m.q_proj.weight.std().item() - 0.02) < 0.004
    assert lm.blocks[0].W_out.weight.std().item() < 0.02 / (2 * 4) ** 0.5 * 1.3
    assert torch.count_nonzero(m.q_proj.bias) == 0


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=32"):
        ModelConfig(d_model=32, n_heads=3).validate()
    with pytest.raises(ValueError, match="one per layer"):
        ModelConfig(n_layers=2, layer_mixers=["sessa"]).validate()
    with pytest.raises(ValueError, match="set mixer=attention"):
        ModelConfig(block="transformer").validate()


def test_models_never_import_deepspeed_or_megatron():
    for path in MODELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("deepspeed", "megatron")), (path.name, name)
    code = ("import sys, torch, sessa_pt.models, sessa_pt.models.mamba2; "
            "bad = [m for m in sys.modules if m.startswith(('deepspeed', 'megatron'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_full_loss_and_gradients(tied):
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=97, d_model=16, n_layers=2, n_heads=2, tie_embeddings=tied)
    full, chunked = DecoderLM(cfg).double(), DecoderLM(cfg).double()
    chunked.loss_chunk_tokens = 7          # does not divide the 2 x 20 tokens
    ids, labels = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    mask = (torch.rand(2, 20) > 0.3).double()
    a, b = full(ids, labels, mask), chunked(ids, labels, mask)
    a.backward()
    b.backward()
    # lm_loss takes the cross entropy in float32; the fused loss keeps float64 models in float64
    assert torch.allclose(a.double(), b.double(), atol=1e-6)
    for (n, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7), n


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_linear_cross_entropy_equals_plain(dtype, tol):
    """The fused loss (chunks of 5 over 23 rows) against linear + F.cross_entropy in float64:
    value and the gradients of h and W, with a mask and ignored (-100) labels."""
    from sessa_pt.models.lm import chunked_lm_loss

    g = torch.Generator().manual_seed(1)
    h = torch.randn(23, 12, generator=g, dtype=torch.float64)
    w = torch.randn(50, 12, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 50, (23,), generator=g)
    y[[3, 17]] = -100
    mask = (torch.rand(23, generator=g) > 0.25).double()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ce = F.cross_entropy(F.linear(hr, wr), y, reduction="none")
    ref = (ce * mask).sum() / mask.sum()
    ref.backward()
    hf, wf = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    out = chunked_lm_loss(hf, wf, y, mask.to(dtype), chunk_tokens=5)
    (out * 3.0).backward()                                   # the incoming gradient scales both
    assert abs(out.item() - ref.item()) < tol
    assert torch.allclose(hf.grad.double(), 3 * hr.grad, atol=tol)
    assert torch.allclose(wf.grad.double(), 3 * wr.grad, atol=tol)


def test_masked_loss_sum_adds_over_micro_batches_token_weighted():
    """Sums and counts of two micro-batches give the mean over all their kept tokens, which
    the mean of the two batch means is not (they keep 1 and 3 tokens)."""
    from sessa_pt.models.lm import lm_loss, masked_loss_sum, mean_loss

    ce_a, ce_b = torch.tensor([[1.0, 5.0]]), torch.tensor([[2.0, 4.0, 6.0, 8.0]])
    m_a, m_b = torch.tensor([[1, 0]]), torch.tensor([[1, 1, 0, 1]])
    (sa, na), (sb, nb) = masked_loss_sum(ce_a, m_a), masked_loss_sum(ce_b, m_b)
    assert (sa.item(), na.item(), sb.item(), nb.item()) == (1.0, 1.0, 14.0, 3.0)
    assert mean_loss(sa + sb, na + nb).item() == pytest.approx(15.0 / 4)
    assert masked_loss_sum(ce_b)[1].item() == 4.0                    # no mask: all kept
    assert mean_loss(*masked_loss_sum(ce_a, torch.zeros(1, 2))).item() == 0.0
    with pytest.raises(ValueError, match="loss_mask has 2 positions"):
        masked_loss_sum(ce_b, m_a)
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    assert torch.allclose(lm_loss(logits, labels, mask), ce[mask.flatten().bool()].mean())


def test_chunked_loss_sum_is_the_masked_sum():
    from sessa_pt.models.lm import chunked_lm_loss_sum, masked_loss_sum

    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(9, 6, generator=g, dtype=F64), torch.randn(11, 6, generator=g, dtype=F64)
    y, mask = torch.randint(0, 11, (9,), generator=g), torch.rand(9, generator=g) > 0.4
    want = masked_loss_sum(F.cross_entropy(F.linear(h, w), y, reduction="none"), mask)
    got = chunked_lm_loss_sum(h, w, y, mask, chunk_tokens=4)
    assert torch.allclose(got[0], want[0]) and got[1].item() == want[1].item()


def test_accumulation_dtype():
    from sessa_kernels.precision import accumulation_dtype

    bf, f64 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=F64)
    assert accumulation_dtype(bf) == torch.float32
    assert accumulation_dtype(bf, f64) == F64 and accumulation_dtype(torch.float64) == F64
    with pytest.raises(ValueError):
        accumulation_dtype()


def test_init_tells_norms_by_module_type_not_by_name():
    """A norm module under any name keeps its own init; a Linear whose name says 'norm' is
    initialised like any Linear."""
    from sessa_pt.models.lm import init_lm_weights

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.denorm = torch.nn.Linear(256, 256)
            self.post = torch.nn.LayerNorm(8)

    toy = Toy()
    with torch.no_grad():
        toy.post.weight.fill_(2.0)
        toy.post.bias.fill_(0.5)
    init_lm_weights(toy, ModelConfig(n_layers=2, init_std=0.02))
    assert torch.all(toy.post.weight == 2.0) and torch.all(toy.post.bias == 0.5)
    assert abs(toy.denorm.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(toy.denorm.bias) == 0


@pytest.mark.parametrize("chunk", [0, 5])
def test_sequential_lm_runs_the_decoder_forward(chunk):
    """SequentialLM (tp=1, pp=1) and DecoderLM are one forward: the same logits and loss."""
    from sessa_pt.parallel.model import SequentialLM
    from sessa_pt.parallel.topology import ParallelLayout

    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2).validate()
    ref = DecoderLM(cfg, seed=1)
    ref.loss_chunk_tokens = chunk
    seq = SequentialLM(cfg, 1, ParallelLayout(1, 0, 1, 1, 1, 0, 0, 0), loss_chunk_tokens=chunk)
    ids, labels = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 7))
    mask = torch.rand(2, 7) > 0.5
    assert torch.equal(seq.logits(ids), ref(ids))
    assert torch.allclose(seq(ids, labels, mask), ref(ids, labels, mask), atol=1e-6)
