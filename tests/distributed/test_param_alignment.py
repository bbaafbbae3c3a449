"""DeepSpeed ZeRO-1 packs each param group into one flat buffer and makes every parameter a
view of it; a parameter of odd size (Sessa's gamma_bias, Mamba2's per-head vectors) shifts the
later ones off 16-byte alignment (cuBLAS alignment-1 kernels; a CUDA "misaligned address" under
inductor). The engine orders each group so that it cannot happen, and checks it."""

from __future__ import annotations

import subprocess
import sys

from tests.distributed.conftest import REPO

SCRIPT = r"""
import torch
from sessa_pt.config import load_config
from sessa_pt.models.lm import DecoderLM
from sessa_pt.parallel import engine as E
from sessa_pt.parallel.topology import init_distributed

init_distributed()
ordered = E.aligned_order
# bf16 on CPU is what the GPU runs: a 2-byte element, so a 1- or 3-element parameter shifts
# later ones to a 2-byte boundary
for mixer, extra in (("sessa", []), ("mamba2", ["model.mamba2.head_dim=8"])):
    cfg = load_config(None, [f"model.mixer={mixer}", "model.d_model=24", "model.n_heads=3",
                             "model.n_layers=2", "model.vocab_size=64", "train.precision=bf16",
                             "train.global_batch_size=1", "train.micro_batch_size=1", *extra])
    for order in ("aligned", "model"):
        E.aligned_order = ordered if order == "aligned" else (lambda ps: ps)
        model = DecoderLM(cfg.model, seed=0)
        odd = [n for n, p in model.named_parameters() if p.numel() % E.ALIGN_ELEMENTS]
        try:
            E.build_engine(model, cfg, 1, False)
            bad = []
        except RuntimeError as e:
            bad = ["raised: " + str(e)[:120]]
        print(mixer, order, len(odd), bad, flush=True)
"""


def test_zero1_packs_every_aligned_size_on_a_16_byte_boundary(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" ", 3) for line in out.stdout.splitlines()
            if line.startswith(("sessa ", "mamba2 "))]
    assert len(rows) == 4, out.stdout + out.stderr[-2000:]
    for mixer, order, n_odd, bad in rows:
        assert int(n_odd) > 0, (mixer, "the model has no odd-sized parameter: the test is moot")
        if order == "aligned":
            assert bad == "[]", (mixer, bad)
        else:       # without the ordering DeepSpeed's packing misaligns them, and it is caught
            assert "raised" in bad and "16-byte" in bad, (mixer, bad)
