"""Statistics over seeds and the RESULTS.md section written from a summary."""

from __future__ import annotations

import math

import pytest

from sessa_pt.experiments import results as res


def test_mean_std_and_t_interval() -> None:
    s = res.mean_std_ci([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    half = 4.303 * 0.1 / math.sqrt(3)                     # t_{0.975, 2}
    assert (s["ci95_lo"], s["ci95_hi"]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    one = res.mean_std_ci([0.4])
    assert one["mean"] == 0.4 and one["std"] is None and one["ci95_lo"] is None
    assert res.mean_std_ci([])["n"] == 0
    assert res.t_quantile_975(1) == 12.706 and res.t_quantile_975(100) == 1.960
    with pytest.raises(ValueError, match="at least 2"):
        res.t_quantile_975(0)


def _summary() -> dict:
    runs = []
    for variant, accs in {"sessa": [0.50, 0.60, 0.70], "transformer": [0.40, 0.40, 0.40]}.items():
        for seed, acc in zip((1, 2, 3), accs, strict=True):
            runs.append({"variant": variant, "seed": seed, "lr": 1e-3, "train_seconds": 90.0,
                         "step": 100, "params_non_embedding": 2_400_000,
                         "metrics": {"token_acc": acc}, "val_loss": 2.0 - acc,
                         "bins": [{"lo": 64.0, "hi": 128.0, "acc": acc},
                                  {"lo": 128.0, "hi": 512.0, "acc": acc / 2}],
                         "memory_tail": [{"layer": "0", "mixer": variant, "beta": 0.25 + seed}]})
    return {"title": "T", "description": "D", "started": "now", "environment": "CPU",
            "git_commit": "abc", "variants": ["sessa", "transformer", "mamba2"],
            "labels": {"sessa": "Sessa", "transformer": "Transformer", "mamba2": "Mamba2"},
            "paper": {"sessa": {"token_acc": 0.154}}, "metrics": ["token_acc"],
            "breakdown": "lag", "budget": "B", "test_split": "test", "runs": runs,
            "commands": ["cmd one"],
            "sweep": {"select_metric": "token_acc", "select_mode": "max", "budget": "b",
                      "seed": 0, "lrs": [3e-4, 1e-3, 3e-3],
                      "table": {"sessa": {"0.0003": 0.1, "0.001": 0.3, "0.003": None},
                                "transformer": {"0.0003": None, "0.001": 0.2}},
                      "chosen": {"sessa": 1e-3, "transformer": 1e-3},
                      "runs": [{"variant": "sessa", "lr": 3e-3, "diverged": True},
                               {"variant": "transformer", "lr": 3e-4, "diverged": False}]}}


def test_results_markdown_tables() -> None:
    text = res.results_markdown(_summary())
    half = 4.303 * 0.1 / math.sqrt(3)
    sessa = next(ln for ln in text.splitlines() if ln.startswith("| Sessa | 2.40M |"))
    assert "| 0.6000 ± 0.1000 |" in sessa
    assert f"[{0.6 - half:.4f}, {0.6 + half:.4f}]" in sessa and "| 0.154 |" in sessa
    assert "s1, s2, s3" in sessa and "1.5, 1.5, 1.5 min" in sessa
    trans = next(ln for ln in text.splitlines() if ln.startswith("| Transformer | 2.40M |"))
    assert "| 0.4000 ± 0.0000 |" in trans and trans.count("| - |") == 1   # no paper number
    assert "Mamba2 |" not in text.split("Final runs")[1].split("Per seed")[0]   # no runs
    assert "| Sessa | 0.1000 | 0.3000 | diverged | 0.001 |" in text           # sweep table
    assert "| Transformer | failed | 0.2000 | not run | 0.001 |" in text
    assert "| model | 64-128 | 128-512 |" in text
    assert "| Sessa | 0.600 | 0.300 |" in text                                # bins
    assert "| Sessa | 3 | - | 2.25 ± 1.00 |" in text                    # the tails of every seed
    assert "| Sessa | 1.4000 ± 0.1000 | 1.5000, 1.4000, 1.3000 |" in text      # final val loss
    assert "cmd one" in text
    broken = _summary()
    for r in broken["runs"]:
        r["memory_tail"] = []
    broken["runs"][0]["memory_tail_failed"] = 1
    text = res.results_markdown(broken)
    assert "Memory tail (fitted" not in text
    assert "Memory tail failed for: Sessa seed 1 (exit 1) (logs: `seeds/logs/memtail-" in text


def test_aggregate_skips_failed_runs() -> None:
    s = _summary()
    s["runs"][0]["metrics"] = {}
    agg = res.aggregate(s["runs"], ["token_acc"])
    assert agg["sessa"]["token_acc"]["n"] == 2
    assert agg["sessa"]["token_acc"]["mean"] == pytest.approx(0.65)


def test_training_dynamics_from_the_step_log(tmp_path) -> None:
    import json

    from sessa_pt.experiments.results import dynamics_table, training_dynamics

    norms = [0.5, 0.8, 3.0, 1.2, float("nan"), 0.9, 0.4, 5.0]   # step 5 non-finite
    rows = [{"step": i + 1, "grad_norm": g, "nonfinite": math.isnan(g)} for i, g in enumerate(norms)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "spikes.jsonl").write_text('{"step": 3}\n')
    d = training_dynamics(tmp_path, grad_clip=1.0, warmup=2)
    assert d["max_grad_norm"] == 5.0 and d["max_grad_norm_step"] == 8
    assert d["max_grad_norm_end_of_warmup"] == 3.0          # steps 1..4
    assert d["clipped_fraction"] == 3 / 7 and d["loss_spikes"] == 1
    assert d["nonfinite_steps"] == 1
    assert training_dynamics(tmp_path / "missing", 1.0, 2) == {}
    table = dynamics_table([{"variant": "sessa", "seed": 1, "dynamics": d}], ["sessa"],
                           {"sessa": "Sessa"})
    assert "| Sessa | 1 | 5.00 (8) | 3.00 | 42.9% | 1 | 1 |" in table


def test_memory_tail_table_over_every_seed() -> None:
    text = res.results_markdown(_summary())
    assert "| model | seeds | whole model | layer 0 |" in text
    # betas 1.25, 2.25, 3.25 for seeds 1-3 of each model: mean 2.25, std 1.00
    assert "| Sessa | 3 | - | 2.25 ± 1.00 |" in text
    assert "| Transformer | 3 | - | 2.25 ± 1.00 |" in text
    assert "| Mamba2 |" not in text.split("Memory tail")[1].split("\n\n")[1]   # no runs
