"""sessa-export: the transformers directory of every model family loads offline, without
sessa_pt, and reproduces our logits (fp32, 1e-5), our greedy decoding (through the recurrent
caches) and our tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sessa_pt.hf.export import export, main
from tests.hf.conftest import FAMILIES

transformers = pytest.importorskip("transformers")

PROMPTS = ["The grass is green", "He counted 12345 coins, then 678 more. Rain fell"]
TEXTS = ["Hello world", " leading space", "two  spaces\nnewline\n\n", "digits 12345 and 3.14",
         "Naïve café 漢字 😀", "tab\there", "", "The pass key is 4242."]


@pytest.fixture(scope="module")
def exports(family_runs, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    return {f: export(run_dir, base / f) for f, (run_dir, _) in family_runs.items()}


def _ids(sp, text):
    return [sp.eos_id()] + sp.encode(text)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_logits_and_greedy_decoding_equal_ours(family, family_runs, exports, text_run):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    _, ours = family_runs[family]
    hf, info = AutoModelForCausalLM.from_pretrained(exports[family], trust_remote_code=True,
                                                    output_loading_info=True)
    assert not any(info.values()), info      # no missing, unexpected or mismatched weights
    assert hf.dtype == torch.float32 and not hf.training
    sp = spm.SentencePieceProcessor(model_file=str(text_run["tokenizer"]))
    for text in PROMPTS:
        ids = torch.tensor([_ids(sp, text)])
        with torch.no_grad():
            ref, got = ours(ids), hf(ids).logits
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    batch = torch.tensor([_ids(sp, "The sky is blue."), _ids(sp, "A fox jumped over")])
    lengths = []
    hook = hf.model.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    got = hf.generate(batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    hook.remove()
    ref = ours.generate(batch, 6)
    assert torch.equal(got[:, batch.shape[1]:], ref)
    # prefill, then one token per step: the recurrent caches are used, nothing is recomputed
    assert lengths == [batch.shape[1]] + [1] * 5
    _assert_installed_ops_untouched()


def _assert_installed_ops_untouched() -> None:
    """The export's bundled kernel modules, now imported in this process, defined their own
    operators and left the installed package's in place (``sessa_kernels.oplib``)."""
    import sessa_kernels.chunked  # noqa: F401      (the installed ops exist in this process)
    from torch._library.custom_ops import OPDEFS  # torch's registry of custom ops

    ours = {q: d for q, d in OPDEFS.items() if q.startswith("sessa::")}
    assert ours and all(d._init_fn.__module__.startswith("sessa_kernels.")
                        for d in ours.values()), {q: d._init_fn.__module__ for q, d in ours.items()}


def test_exported_tokenizer_is_the_runs_sentencepiece(exports, text_run):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(text_run["tokenizer"]))
    tok = AutoTokenizer.from_pretrained(exports["sessa"], trust_remote_code=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (sp.bos_id(), sp.eos_id(), sp.pad_id())
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == ids, text      # no bos: the shards add none
        assert tok.decode(ids) == sp.decode(ids), text
    assert tok.decode([sp.eos_id()] + sp.encode("hi"), skip_special_tokens=True) == "hi"
    cfg = json.loads((exports["sessa"] / "config.json").read_text())
    assert cfg["add_bos"] is False and cfg["sessa_model"]["mixer"] == "sessa"


BLOCKER = r'''
import sys, json, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sessa_pt", "sessa_kernels", "sessa_data", "tests"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for family, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = torch.tensor([[tok.eos_token_id] + tok("The grass is green")["input_ids"]])
    with torch.no_grad():
        out[family] = model(ids).logits[0, -1, :8].tolist()
    gen = model.generate(ids, max_new_tokens=3, do_sample=True, top_k=5)
    assert gen.shape == (1, ids.shape[1] + 3)
print(json.dumps(out))
'''


def test_export_loads_where_sessa_pt_is_not_installed(exports, family_runs, text_run,
                                                      tmp_path):
    import sentencepiece as spm

    env = dict(os.environ, PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", BLOCKER,
                           json.dumps({f: str(p) for f, p in exports.items()})],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    sp = spm.SentencePieceProcessor(model_file=str(text_run["tokenizer"]))
    ids = torch.tensor([_ids(sp, "The grass is green")])
    for family, (_, ours) in family_runs.items():
        with torch.no_grad():
            ref = ours(ids)[0, -1, :8]
        torch.testing.assert_close(torch.tensor(got[family]), ref, rtol=0, atol=1e-5)


def test_export_refuses_to_overwrite(family_runs, tmp_path, capsys):
    run_dir, _ = family_runs["sessa"]
    out = tmp_path / "exp"
    assert main([str(run_dir), "--out", str(out)]) == 0
    with pytest.raises(SystemExit, match="--overwrite"):
        main([str(run_dir), "--out", str(out)])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="refusing"):
        main([str(run_dir), "--out", str(tmp_path / "other"), "--overwrite"])
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert main([str(run_dir), "--out", str(out), "--overwrite"]) == 0


def test_export_of_a_real_training_run(trained_text_run, text_run, tmp_path):
    """A checkpoint the trainer wrote (not a hand-made one) exports with identical logits."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    from sessa_pt.eval.common import load_model

    out = export(trained_text_run["run_dir"], tmp_path / "exp")
    ours = load_model(trained_text_run["run_dir"], device="cpu").model
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(text_run["tokenizer"]))
    ids = torch.tensor([_ids(sp, PROMPTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


def test_exported_generate_without_cache_and_unsupported_modes(exports):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exports["mamba2"], trust_remote_code=True)
    x = torch.tensor([[2, 40, 41, 42, 43]])
    cached = hf.generate(x, max_new_tokens=4, do_sample=False, eos_token_id=None)
    full = hf.generate(x, max_new_tokens=4, do_sample=False, eos_token_id=None,
                       use_cache=False)                # full recomputation every step
    assert torch.equal(cached, full)
    with pytest.raises(ValueError, match="padded batches"):
        hf.generate(torch.tensor([[3, 40, 41], [2, 40, 41]]), max_new_tokens=2,
                    attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(NotImplementedError, match="beam search"):
        hf.generate(x, max_new_tokens=2, num_beams=2)


def test_triton_trained_export_runs_the_chunked_solve_on_cpu(text_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.hf.conftest import write_checkpoint

    ours = write_checkpoint(tmp_path / "run", "sessa", text_run,
                            extra=["model.sessa.impl=triton", "model.sessa.chunk_size=16"])
    out = export(tmp_path / "run", tmp_path / "exp")
    assert json.loads((out / "config.json").read_text())["sessa_model"]["sessa"]["impl"] \
        == "triton"                    # as trained; the model picks its solve per device
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for m in ours.modules():
        if type(m).__name__ == "SessaMixer":
            m.impl = "chunked"
    ids = torch.tensor([[2, 50, 60, 70, 80, 90, 100, 110, 120, 130]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
    assert {m.impl for m in hf.modules() if type(m).__name__ == "SessaMixer"} == {"chunked"}
