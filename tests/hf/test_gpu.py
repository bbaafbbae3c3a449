"""GPU checks of the export and sampling (run on a CUDA machine: pytest -m gpu tests/hf)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_export_on_cuda_uses_the_triton_solve_and_matches(text_run, tmp_path):
    """A Triton-trained Sessa checkpoint: the exported model runs the Triton feedback solve and
    the fused decode step on CUDA, and agrees with ours there."""
    from transformers import AutoModelForCausalLM

    from sessa_pt.hf.export import export
    from tests.hf.conftest import write_checkpoint

    ours = write_checkpoint(tmp_path / "run", "sessa", text_run,
                            extra=["model.sessa.impl=triton", "model.sessa.chunk_size=64",
                                   "model.d_model=64"]).cuda()
    out = export(tmp_path / "run", tmp_path / "exp")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).cuda()
    ids = torch.randint(4, 400, (2, 96), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        ref, got = ours(ids), hf(ids).logits
    assert all(m.impl == "triton" for m in hf.modules() if type(m).__name__ == "SessaMixer")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    g = hf.generate(ids[:1, :16], max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(g[:, 16:], ours.generate(ids[:1, :16], 8))


def test_sampling_on_cuda_repeats_with_the_seed(family_runs):
    _, model = family_runs["sessa"]
    model = model.cuda()
    x = torch.randint(4, 400, (2, 9), device="cuda")

    def draw(seed):
        return model.generate(x, 12, temperature=1.0, top_p=0.9,
                              generator=torch.Generator(device="cuda").manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    model.cpu()
