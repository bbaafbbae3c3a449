"""sessa-eval harness: the lm-eval LM wrapper's scores equal our model's, the local tasks are
built from the run's held-out split and run offline, and results reach the run's mlflow."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

pytest.importorskip("lm_eval")

from sessa_pt.eval.common import load_model
from sessa_pt.eval.harness import (
    SessaHarnessLM,
    cloze_examples,
    flat_metrics,
    held_out_documents,
)
from sessa_pt.eval.run_tokenizer import find_run_tokenizer


def _req(*args):
    return types.SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def harness_lm(family_runs):
    run_dir, _ = family_runs["sessa"]
    loaded = load_model(run_dir, device="cpu")
    tok = find_run_tokenizer(loaded.cfg)
    sp = tok.processor()
    return SessaHarnessLM(loaded, sp, tok.prefix(sp), batch_size=3, max_length=200)


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def test_loglikelihood_equals_our_model(harness_lm):
    lm, sp = harness_lm, harness_lm.sp
    eos = sp.eos_id()
    assert lm.prefix == [eos]          # the shards framed documents with eos only
    reqs = [_req("The grass is green and the", " sky is blue."),
            _req("A fox jumped over the lazy ", "dog"),      # trailing space moves over
            _req("", "Rain fell")]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (score, greedy) in zip([r.args for r in reqs], got, strict=True):
        c = ctx.rstrip()
        ctx_ids = [eos] + (sp.encode(c) if c else [])
        full = [eos] + sp.encode(ctx + cont)
        assert full[:len(ctx_ids)] == ctx_ids
        lp = _logprobs(lm.model, full[:-1])
        n = len(full) - len(ctx_ids)
        target = torch.tensor(full[-n:])
        ref = lp[-n:].gather(-1, target[:, None]).sum().item()
        assert score == pytest.approx(ref, abs=1e-4)
        assert greedy == bool((lp[-n:].argmax(-1) == target).all())


def test_loglikelihood_rolling_covers_every_token_once(harness_lm):
    lm, sp = harness_lm, harness_lm.sp
    text = "They met again in the old library. Numbers like 3.14 appear."
    ids = sp.encode(text)
    lp = _logprobs(lm.model, [sp.eos_id()] + ids[:-1])
    ref = lp.gather(-1, torch.tensor(ids)[:, None]).sum().item()
    (got,) = lm.loglikelihood_rolling([_req(text)])
    assert got == pytest.approx(ref, abs=1e-4)
    lm.max_length = 8                  # windows of 8: still one score per token
    scored, score = [], lm._score
    lm._score = lambda pairs: scored.extend(pairs) or score(pairs)
    try:
        (short,) = lm.loglikelihood_rolling([_req(text)])
    finally:
        lm.max_length, lm._score = 200, score
    assert sum(len(c) for _, c in scored) == len(ids) and len(scored) > 1
    assert all(len(a) + len(b) <= 9 for a, b in scored)
    assert [t for _, c in scored for t in c] == ids
    assert math.isfinite(short)


def test_generate_until_is_greedy_decoding_cut_at_the_stop(harness_lm):
    lm, sp = harness_lm, harness_lm.sp
    ctx = "The sky is"
    ref_ids = lm.model.generate(torch.tensor([[sp.eos_id()] + sp.encode(ctx)]), 12,
                                vocab_limit=sp.get_piece_size())[0].tolist()
    ref = sp.decode(ref_ids)
    (full,) = lm.generate_until([_req(ctx, {"until": [], "max_gen_toks": 12})])
    assert full == ref
    stop = ref.strip()[:2] if ref.strip() else "x"
    (cut,) = lm.generate_until([_req(ctx, {"until": [stop], "max_gen_toks": 12})])
    assert cut == ref.split(stop)[0]


def test_held_out_documents_and_cloze(text_run):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(text_run["tokenizer"]))
    docs = list(held_out_documents(text_run["valid"]))
    lines = (text_run["base"] / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    sources = {json.loads(line)["text"] for line in lines}
    assert docs and all(sp.decode(d) in sources for d in docs[:-1])
    assert any(s.startswith(sp.decode(docs[-1])) for s in sources)   # cut short by packing
    rows = cloze_examples(sp, docs, 30, limit=10_000)
    assert len(rows) > len(docs)          # several passages per document
    for r in rows:
        assert r["target"].startswith(" ") and r["target"][1:].isalpha()
        assert any((r["context"] + r["target"]) in s for s in sources)
        assert len(sp.encode(r["context"] + r["target"])) <= 30 + 2
    assert len(cloze_examples(sp, docs, 30, limit=7)) == 7


def test_flat_metrics_names():
    res = {"results": {"sessa_cloze": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                       "perplexity,none": float("inf")},
                       "sessa_passkey": {"exact_match,first_int": 1.0}}}
    assert flat_metrics(res) == {"harness_sessa_cloze_acc": 0.5,
                                 "harness_sessa_passkey_exact_match_first_int": 1.0}


def test_cli_runs_offline_and_logs_to_the_training_run(trained_text_run, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sessa_pt.eval.cli import main

    out = tmp_path / "harness.json"
    assert main(["harness", trained_text_run["run_dir"], "--limit", "4", "--device", "cpu",
                 "--max-length", "400", "--passkey-length", "300", "--passkey-samples", "2",
                 "--bootstrap-iters", "0", "--json", str(out),
                 "--mlflow-run-id", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "sessa_cloze" in printed and "sessa_passkey" in printed and "exact_match" in printed
    result = json.loads(out.read_text())
    assert set(result["metrics"]) >= {"harness_sessa_cloze_acc",
                                      "harness_sessa_passkey_exact_match_first_int"}
    assert result["n-samples"]["sessa_cloze"]["effective"] == 4
    run = MlflowClient(trained_text_run["uri"]).get_run(trained_text_run["run_id"])
    assert run.data.metrics["harness_sessa_cloze_acc"] == result["metrics"][
        "harness_sessa_cloze_acc"]
    history = MlflowClient(trained_text_run["uri"]).get_metric_history(
        trained_text_run["run_id"], "harness_sessa_cloze_acc")
    assert [m.step for m in history] == [result["step"]]


def test_cli_rejects_unknown_tasks(family_runs):
    from sessa_pt.eval.cli import main

    with pytest.raises(SystemExit, match="unknown harness task"):
        main(["harness", str(family_runs["sessa"][0]), "--tasks", "no_such_task_xyz",
              "--device", "cpu"])
