"""Recipe families are matched by construction: every variant differs from the family's Sessa
variant only in architecture fields (``model.*``, ``run.name``) and has non-embedding parameters
within 2% of it."""

from __future__ import annotations

import pathlib

import pytest

from sessa_pt import recipes_check as rc
from sessa_pt.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = ["tiny", "small", "m125", "m350", "symbolsoup", "symbolsoup2048"]
VARIANTS = {"sessa": ("sessa", "gated"), "transformer": ("attention", "gated"),
            "mamba2": ("mamba2", "gated"), "transformer_mlp": ("attention", "transformer")}


# Variants beyond the four of every family: Sessa with the paper's gain form, same shape.
EXTRA = {"symbolsoup": {"sessa_paper": ("sessa", "gated")},
         "symbolsoup2048": {"sessa_paper": ("sessa", "gated")}}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_matched(family: str) -> None:
    variants = rc.load_family(ROOT / "recipes" / family)
    by_name = {v.name: v for v in variants}
    expected = {**VARIANTS, **EXTRA.get(family, {})}
    assert set(by_name) == set(expected)
    ref = by_name["sessa"]
    if "sessa_paper" in by_name:
        v = by_name["sessa_paper"]
        assert v.cfg.model.sessa.variant == "paper" and ref.cfg.model.sessa.variant != "paper"
        assert v.params_non_embedding == ref.params_non_embedding
    for name, (mixer, block) in expected.items():
        v = by_name[name]
        assert (v.cfg.model.mixer, v.cfg.model.block) == (mixer, block)
        assert rc.non_architecture_differences(ref.cfg, v.cfg) == []
        # identical data, tokenizer, batch, sequence length, schedule, seed
        for section in ("data", "optim", "train", "tracking", "eval", "checkpoint", "parallel"):
            assert getattr(v.cfg, section) == getattr(ref.cfg, section), (name, section)
        assert v.cfg.run.seed == ref.cfg.run.seed
        assert abs(v.params_non_embedding / ref.params_non_embedding - 1) <= 0.02, name
    assert rc.problems(ROOT / "recipes" / family, variants=variants) == []


def test_tiny_recipes_read_what_the_quick_start_writes() -> None:
    """The README's torchrun command runs recipes/tiny without data overrides, so the recipes
    must point at the quick start's shards, with its sequence length and vocabulary."""
    from sessa_pt import quickstart

    _, _, shards = quickstart.data_layout(quickstart.DATA_DIR)
    for variant in rc.family_recipes(ROOT / "recipes" / "tiny"):
        cfg = load_config(variant)
        assert pathlib.Path(cfg.data.train) == shards / "train" / "manifest.json", variant
        assert pathlib.Path(cfg.data.valid) == shards / "valid" / "manifest.json", variant
        assert cfg.data.seq_len == quickstart.SEQ_LEN, variant
        assert cfg.model.vocab_size == quickstart.VOCAB_SIZE, variant


def test_check_detects_a_mismatch(tmp_path: pathlib.Path, capsys) -> None:
    fam = tmp_path / "fam"
    fam.mkdir()
    (fam / "base.yaml").write_text((ROOT / "recipes" / "tiny" / "base.yaml").read_text())
    (fam / "sessa.yaml").write_text("base: base.yaml\nmodel:\n  mixer: sessa\n")
    (fam / "transformer.yaml").write_text(
        "base: base.yaml\nmodel:\n  mixer: attention\noptim:\n  lr: 1.0e-3\n")
    assert rc.main([str(fam)]) == 1
    out = capsys.readouterr().out
    assert "optim.lr" in out and "non-embedding parameters" in out
    assert "ratio" in out and "GFLOPs/tok" in out


def test_cli_table_passes(capsys) -> None:
    assert rc.main([str(ROOT / "recipes" / "symbolsoup")]) == 0
    out = capsys.readouterr().out
    assert "OK: matched" in out and "transformer_mlp" in out
