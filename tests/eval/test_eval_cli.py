"""The evaluation CLI on real checkpoints: task accuracy (by length and by lag), perplexity,
passkey retrieval and the trained-model memory tail, with JSON output and mlflow logging."""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from sessa_pt.eval import cli
from sessa_pt.eval.common import load_model, resolve_checkpoint

from .conftest import write_checkpoint


def test_help_of_every_subcommand(capsys) -> None:
    for sub in ("ppl", "task", "passkey", "memory-tail"):
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--help"])
        assert exc.value.code == 0
        assert "--mlflow-run-id" in capsys.readouterr().out


def test_task_accuracy_on_trained_run(trained_run, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "task.json"
    test = f"{trained_run['data']}/test/manifest.json"
    assert cli.main(["task", trained_run["run_dir"], "--data", test, "--json", str(out),
                     "--mlflow-run-id", "auto", "--bins", "3"]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "symbolsoup" and r["split"] == "test" and r["breakdown"] == "length"
    assert r["examples"] == r["targets"] == 24
    assert sum(b["n"] for b in r["bins"]) == 24
    # the same accuracy by hand: argmax of the full-length forward at the position before <cK>
    from sessa_pt.data import TokenShardDataset

    loaded = load_model(trained_run["checkpoint"])
    ds = TokenShardDataset(test)
    correct = []
    for i in range(len(ds)):
        toks = torch.from_numpy(ds.tokens_numpy(i).astype(np.int64))
        pos = int(np.nonzero(ds.mask_numpy(i))[0][0])
        with torch.no_grad():
            logits = loaded.model(toks[None, :-1])
        correct.append(int(logits[0, pos].argmax()) == int(toks[pos + 1]))
    assert r["token_acc"] == pytest.approx(np.mean(correct))
    weighted = sum(b["acc"] * b["n"] for b in r["bins"]) / 24
    assert weighted == pytest.approx(r["token_acc"])
    # logged into the training run at the checkpoint's step, curve as a history
    client = MlflowClient(trained_run["uri"])
    run = client.get_run(trained_run["run_id"])
    assert run.data.metrics["symbolsoup_test_acc"] == pytest.approx(r["token_acc"])
    hist = client.get_metric_history(trained_run["run_id"], "symbolsoup_test_acc_by_length")
    assert len(hist) == len(r["bins"]) and all(60 <= h.step <= 100 for h in hist)
    assert client.get_metric_history(trained_run["run_id"], "symbolsoup_test_acc")[0].step == 2
    assert any(a.path.startswith("eval") for a in client.list_artifacts(trained_run["run_id"]))
    # a run directory and its checkpoint directory resolve to the same checkpoint
    assert resolve_checkpoint(trained_run["run_dir"]) == pathlib.Path(trained_run["checkpoint"])


def test_checkpoint_first_argument_order() -> None:
    assert cli.normalize_argv(["runs/x", "task", "--data", "m.json"]) == \
        ["task", "runs/x", "--data", "m.json"]
    assert cli.normalize_argv(["ppl", "runs/x"]) == ["ppl", "runs/x"]


def test_task_accuracy_by_lag_on_mqar(mqar: pathlib.Path, tmp_path: pathlib.Path) -> None:
    run = tmp_path / "mqar_run"
    write_checkpoint(run, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                           "data.seq_len=64"])
    out = tmp_path / "mqar.json"
    assert cli.main(["task", str(run), "--data", f"{mqar}/test/manifest.json", "--json",
                     str(out), "--bins", "4"]) == 0
    r = json.loads(out.read_text())
    assert r["breakdown"] == "lag" and r["task"] == "mqar-diffuse"
    assert r["targets"] == 16 * 2                     # 2 queried pairs x 1 value token
    assert sum(b["n"] for b in r["bins"]) == r["targets"]
    assert all(31 <= b["lo"] and b["hi"] <= 64 for b in r["bins"])   # test lags > lag_max
    assert sum(b["acc"] * b["n"] for b in r["bins"]) / r["targets"] == \
        pytest.approx(r["token_acc"])


def test_ppl_matches_a_direct_computation(text_data, tmp_path: pathlib.Path) -> None:
    run = tmp_path / "lm_run"
    model = write_checkpoint(run, ["model.vocab_size=384", "model.d_model=32",
                                   "model.n_layers=2", "data.seq_len=32"])
    out = tmp_path / "ppl.json"
    assert cli.main(["ppl", str(run), "--data", str(text_data["valid"]), "--json", str(out),
                     "--batch-size", "3"]) == 0
    r = json.loads(out.read_text())
    from sessa_pt.data import TokenShardDataset

    ds = TokenShardDataset(text_data["valid"])
    toks = torch.stack([torch.from_numpy(ds.tokens_numpy(i).astype(np.int64))
                        for i in range(len(ds))])
    with torch.no_grad():
        logits = model.eval()(toks[:, :-1])
    loss = float(F.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten()))
    assert r["tokens"] == toks[:, 1:].numel() and r["samples"] == len(ds)
    assert r["loss"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert 0 <= r["top1"] <= r["top5"] <= 1


def test_passkey_table_and_exact_match(text_data, tmp_path: pathlib.Path, monkeypatch,
                                       capsys) -> None:
    import sentencepiece as spm

    from sessa_pt.eval import passkey

    run = tmp_path / "pk_run"
    write_checkpoint(run, ["model.vocab_size=384", "model.d_model=32", "model.n_layers=2"])
    sp = spm.SentencePieceProcessor(model_file=str(text_data["tokenizer"]))
    prompt = passkey.build_prompt(sp, 320, 0.5, 4242)
    assert len(prompt) <= 320 and "pass key is 4242" in sp.decode(prompt)
    args = ["passkey", str(run), "--tokenizer", str(text_data["tokenizer"]), "--lengths",
            "280,360", "--depths", "0,1", "--samples", "2"]
    out = tmp_path / "pk.json"
    assert cli.main([*args, "--json", str(out)]) == 0       # the real (untrained) model
    r = json.loads(out.read_text())
    assert len(r["cells"]) == 4 and all(c["samples"] == 2 for c in r["cells"])
    assert all(c["outputs"][0]["prompt_tokens"] <= c["length"] for c in r["cells"])
    assert "depth \\ length" in capsys.readouterr().out

    def oracle(self, input_ids, max_new_tokens):   # answers with the key found in the prompt
        key = re.search(r"pass key is (\d+)", sp.decode(input_ids[0].tolist())).group(1)
        return torch.tensor([sp.encode(f" {key}.")[:max_new_tokens]])

    from sessa_pt.models.lm import DecoderLM

    monkeypatch.setattr(DecoderLM, "generate", oracle)
    assert cli.main([*args, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["acc"] == 1.0


def test_memory_tail_on_trained_run(trained_run, tmp_path: pathlib.Path) -> None:
    out, png = tmp_path / "tail.json", tmp_path / "tail.png"
    assert cli.main(["memory-tail", trained_run["checkpoint"], "--seq-len", "48", "--n-lags",
                     "16", "--fit-min-lag", "4", "--probes", "4", "--json", str(out), "--plot",
                     str(png), "--data", f"{trained_run['data']}/valid/manifest.json",
                     "--mlflow-run-id", trained_run["run_id"], "--tracking-uri",
                     trained_run["uri"]]) == 0
    r = json.loads(out.read_text())
    assert [row["layer"] for row in r["layers"]] == ["0", "1", "model"]
    assert all(math.isfinite(row["beta"]) and row["fit_points"] >= 3 for row in r["layers"])
    assert all(len(row["influence"]) == len(r["lags"]) for row in r["layers"])
    assert png.stat().st_size > 1000
    client = MlflowClient(trained_run["uri"])
    metrics = client.get_run(trained_run["run_id"]).data.metrics
    assert metrics["memtail_beta_layer0"] == pytest.approx(r["layers"][0]["beta"])
    hist = client.get_metric_history(trained_run["run_id"], "memtail_influence_model")
    assert sorted(h.step for h in hist) == r["lags"]
