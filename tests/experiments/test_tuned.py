"""The two-phase tuned comparison: the plan each experiment runs (dry run), the learning-rate
choice on the validation split, and the seeds phase reading that choice."""

from __future__ import annotations

import json
import pathlib

import pytest

from sessa_pt.experiments import tuned
from sessa_pt.experiments.__main__ import EXPERIMENTS, main


def _cmds(capsys) -> list[str]:
    return [ln[2:] for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]


@pytest.mark.parametrize("name,models", [("symbolsoup", 4), ("symbolsoup2048", 4), ("mqar", 3),
                                         ("lm", 4)])
def test_sweep_plan(name: str, models: int, tmp_path: pathlib.Path, capsys) -> None:
    assert main([name, "sweep", "--dry-run", "--out", str(tmp_path / "o"), "--data",
                 str(tmp_path / "d"), "--gpus", "0", "--runs-per-gpu", "12"]) == 0
    cmds = _cmds(capsys)
    train = [c for c in cmds if "sessa_pt.train" in c]
    exp = EXPERIMENTS[name]()
    assert len(train) == models * len(exp.lrs) and len(exp.lrs) >= 3
    for lr in exp.lrs:
        assert sum(f" optim.lr={lr:g} " in c for c in train) == models
    assert all(c.startswith("CUDA_VISIBLE_DEVICES=0 ") for c in train)
    assert all(f"train.steps={exp.sweep_budget.steps} " in c for c in train)
    evals = [c for c in cmds if "sessa_pt.eval.cli" in c]
    assert len(evals) == len(train)
    if name == "lm":     # the selection split: the in-distribution sample, never the held-out
        assert all("/shards/valid/manifest.json" in c and "heldout" not in c.split("--name")[0]
                   for c in evals)
        assert any("recipes/lm_table2/sessa_nofb.yaml" in c for c in train)
    else:
        if name.startswith("symbolsoup"):   # the paper's gain beside the reference Sessa
            family = "symbolsoup" if name == "symbolsoup" else name
            assert sum(f"recipes/{family}/sessa_paper.yaml" in c for c in train) == len(exp.lrs)
        assert all("/valid/manifest.json" in c for c in evals)
    assert not (tmp_path / "o").exists()


def test_data_commands(tmp_path: pathlib.Path, capsys) -> None:
    main(["mqar", "sweep", "--dry-run", "--out", str(tmp_path / "o"), "--data", str(tmp_path)])
    gen = _cmds(capsys)[0]
    assert "mqar --variant diffuse" in gen and "--lag-min 64 --lag-max 128" in gen
    assert "--test-lag-min 64 --test-lag-max 512" in gen      # 4x the longest training lag
    from sessa_pt.experiments.mqar import DiffuseMQAR

    longest = max(DiffuseMQAR.sweep_budget.steps, DiffuseMQAR.final_budget.steps)
    assert f"--train {longest * 64}" in gen                   # the longest phase's examples
    main(["lm", "sweep", "--dry-run", "--out", str(tmp_path / "o"), "--data", str(tmp_path)])
    cmds = _cmds(capsys)
    tok = [c for c in cmds if "sessa_data.cli tokenize" in c]
    assert len(tok) == 2 and "--valid-fraction 0.01" in tok[0] and "brown" not in tok[0]
    assert "raw/brown.jsonl --valid-sources brown" in tok[1]


def _fake_phase(scores: dict[tuple[str, float], float], key: str):
    def run(ctx, phase, plan, budget, split):
        assert phase == "sweep" and split == "valid"
        return [{"variant": v, "lr": lr, "seed": s, "key": k, "train_seconds": 1.0,
                 "metrics": {key: scores[(v, lr)]} if (v, lr) in scores else {}}
                for v, lr, s, k in plan]
    return run


def test_sweep_picks_each_models_best_rate_on_validation(tmp_path, monkeypatch) -> None:
    scores = {("sessa", 3e-4): 0.2, ("sessa", 1e-3): 0.5, ("sessa", 3e-3): 0.1,
              ("transformer", 3e-4): 0.6, ("transformer", 1e-3): 0.3}   # 3e-3 failed
    monkeypatch.setattr(tuned, "_train_and_eval", _fake_phase(scores, "token_acc"))
    out = tmp_path / "o"
    (tmp_path / "d" / "test").mkdir(parents=True)
    (tmp_path / "d" / "test" / "manifest.json").write_text("{}")   # data present: no prep
    assert main(["mqar", "sweep", "--out", str(out), "--data", str(tmp_path / "d"),
                 "--variants", "sessa,transformer,mamba2"]) == 0
    choice = json.loads((out / "sweep" / "choice.json").read_text())
    assert choice["chosen"] == {"sessa": 1e-3, "transformer": 3e-4}       # mamba2: all failed
    assert choice["table"]["transformer"]["0.003"] is None and choice["split"] == "valid"


def test_lm_sweep_minimises_validation_loss(tmp_path, monkeypatch) -> None:
    from sessa_pt.experiments.lm import LanguageModel

    lo, mid, *rest = LanguageModel.lrs
    scores = {("sessa", lo): 4.0, ("sessa", mid): 3.5, **{("sessa", lr): 3.9 for lr in rest}}
    monkeypatch.setattr(tuned, "_train_and_eval", _fake_phase(scores, "loss"))
    (tmp_path / "d" / "shards" / "valid").mkdir(parents=True)
    (tmp_path / "d" / "heldout" / "valid").mkdir(parents=True)
    for sub in ("shards", "heldout"):
        (tmp_path / "d" / sub / "valid" / "manifest.json").write_text("{}")
    main(["lm", "sweep", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
          "--variants", "sessa"])
    choice = json.loads((tmp_path / "o" / "sweep" / "choice.json").read_text())
    assert choice["chosen"] == {"sessa": mid} and choice["select_mode"] == "min"


def test_seeds_phase_uses_the_choice(tmp_path: pathlib.Path, capsys) -> None:
    choice = tmp_path / "choice.json"
    choice.write_text(json.dumps({"chosen": {"sessa": 3e-4, "transformer": 3e-3}}))
    assert main(["mqar", "seeds", "--dry-run", "--out", str(tmp_path / "o"), "--data",
                 str(tmp_path / "d"), "--variants", "sessa,transformer,mamba2", "--choice",
                 str(choice), "--lr", "mamba2=1e-3"]) == 0
    train = [c for c in _cmds(capsys) if "sessa_pt.train" in c]
    assert len(train) == 9
    for v, lr in [("sessa", "0.0003"), ("transformer", "0.003"), ("mamba2", "0.001")]:
        mine = [c for c in train if f"recipes/mqar_diffuse/{v}.yaml" in c]
        assert len(mine) == 3 and all(f"optim.lr={lr} " in c for c in mine)
        assert {c.split("run.seed=")[1].split()[0] for c in mine} == {"1", "2", "3"}


def test_overrides_after_the_options_reach_every_run(tmp_path: pathlib.Path, capsys) -> None:
    """gpu_call.sh puts its own options first and the caller's after them: a key=value there
    (a study's optim.grad_clip=10) must not be refused."""
    assert main(["mqar", "seeds", "--dry-run", "--out", str(tmp_path / "o"), "--data",
                 str(tmp_path / "d"), "--variants", "sessa", "--lr", "sessa=1e-3",
                 "--warmup", "45", "--study", "clip10", "optim.grad_clip=10"]) == 0
    train = [c for c in _cmds(capsys) if "sessa_pt.train" in c]
    assert len(train) == 3
    assert all(" optim.grad_clip=10" in c and "optim.warmup_steps=45" in c for c in train)


def test_seeds_without_a_choice_says_what_to_do(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SystemExit, match="run the sweep phase first"):
        main(["mqar", "seeds", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
              "--variants", "sessa"])


def test_bad_input_is_rejected(tmp_path: pathlib.Path) -> None:
    base = ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "d")]
    with pytest.raises(SystemExit, match="at least 3 learning rates"):
        main(["mqar", "sweep", "--dry-run", "--lrs", "1e-3,2e-3", *base])
    with pytest.raises(SystemExit, match="no recipe"):
        main(["mqar", "sweep", "--dry-run", "--variants", "sesa", *base])
    with pytest.raises(SystemExit, match="warmup 500 must be below steps 100"):
        main(["mqar", "sweep", "--dry-run", "--sweep-steps", "100", "--sweep-warmup", "500",
              *base])
    with pytest.raises(SystemExit, match="VARIANT=LR"):
        main(["mqar", "seeds", "--dry-run", "--lr", "1e-3", *base])
    with pytest.raises(SystemExit, match="names a folder"):
        main(["mqar", "seeds", "--dry-run", "--lr", "sessa=1e-3", "--variants", "sessa",
              "--study", "../up", *base])
    with pytest.raises(SystemExit, match="for the seeds phase"):
        main(["mqar", "all", "--dry-run", "--study", "warmup450", *base])
    assert main(["nope"]) == 2


def test_sweep_tie_goes_to_the_lower_validation_loss() -> None:
    """Every rate at chance accuracy (Mamba2 after a short SymbolSoup sweep): the lower final
    validation loss decides, then the lower rate."""
    scores = {2.5e-4: 0.05, 5e-4: 0.05, 1e-3: 0.05}
    assert tuned._best_rate(scores, {2.5e-4: 2.9981, 5e-4: 2.9979, 1e-3: None}, "max") == 5e-4
    assert tuned._best_rate(scores, {}, "max") == 2.5e-4
    assert tuned._best_rate({1e-3: 3.5, 2e-3: 3.4}, {1e-3: 3.0, 2e-3: 3.9}, "min") == 2e-3
