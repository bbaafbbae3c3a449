"""The tensor-parallel plan on every stage type, in two gloo processes (tp=2): the converted
stage computes the plain stage's output (its rank's slice where the output is split), and
``plain_state_dict`` of the converted stage is exactly the plain stage's state dict."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from sessa_pt.models.config import Mamba2Options, ModelConfig
from sessa_pt.models.lm import build_stage

CONFIGS = {
    "gated-sessa": {"mixer": "sessa"},
    "gated-attention": {"mixer": "attention", "tie_embeddings": False},
    "gated-mamba2": {"mixer": "mamba2", "mamba2": Mamba2Options(d_state=8, head_dim=8,
                                                                n_groups=2, chunk_size=8)},
    "transformer": {"mixer": "attention", "block": "transformer", "mlp_hidden": 24},
}


def _cfg(kind: str) -> ModelConfig:
    return ModelConfig(vocab_size=38, d_model=16, n_layers=1, n_heads=2,
                       **CONFIGS[kind]).validate()


def _check_rank(rank: int, port: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sessa_pt.parallel import cpu_shims
    from sessa_pt.parallel.tensor_parallel import (
        apply_tensor_parallel,
        megatron_config,
        plain_state_dict,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cpu_shims.install_if_needed()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    config = megatron_config(2, 1)
    torch.manual_seed(0)
    h = torch.randn(2, 6, 16)
    ids = torch.randint(0, 38, (2, 6))
    for kind in CONFIGS:
        cfg = _cfg(kind)
        plain = [build_stage(cfg, i, seed=3) for i in range(3)]   # embed, block, head
        # built afresh (build_stage is deterministic), not deep-copied: a deep copy of a
        # Parameter drops its flags (_no_weight_decay), which the plan must carry over
        converted = [apply_tensor_parallel(build_stage(cfg, i, seed=3), config)
                     for i in range(3)]
        for plain_m, tp_m in zip(plain, converted):
            want, got = plain_m.state_dict(), plain_state_dict(tp_m)
            assert sorted(got) == sorted(want), (kind, sorted(got), sorted(want))
            for k in want:
                assert torch.equal(got[k], want[k]), (kind, k)
        emb, block, head = plain
        emb_tp, block_tp, head_tp = converted
        with torch.no_grad():
            assert torch.allclose(emb_tp(ids), emb(ids), atol=1e-6), kind
            assert torch.allclose(block_tp(h), block(h), atol=1e-5), kind
            full = head(h, emb.weight)
            local = head_tp(h, emb_tp.weight)
            assert torch.allclose(local, full.chunk(2, -1)[rank], atol=1e-6), kind
        if kind == "gated-mamba2":
            m = block_tp.mixer
            assert type(m).__name__ == "Mamba2Mixer"                     # no class surgery
            assert m.dt_bias._no_weight_decay and m.dt_bias.shape == (2,)  # 4 heads over 2
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp_plan_round_trips_and_matches_plain_forward():
    mp.spawn(_check_rank, args=(_free_port(),), nprocs=2, join=True)
