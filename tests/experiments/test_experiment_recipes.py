"""The new recipe families are matched (recipes_check), and the no-feedback ablation is Sessa's
shape with only the feedback switched off."""

from __future__ import annotations

import pathlib

import pytest

from sessa_pt import recipes_check as rc

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family,variants", [
    ("mqar_diffuse", {"sessa", "transformer", "mamba2"}),
    ("lm_table2", {"sessa", "transformer", "mamba2", "sessa_nofb"})])
def test_family_is_matched(family: str, variants: set[str]) -> None:
    found = rc.load_family(ROOT / "recipes" / family)
    assert {v.name for v in found} == variants
    assert rc.problems(ROOT / "recipes" / family, variants=found) == []
    by = {v.name: v for v in found}
    for name in variants - {"sessa_nofb"}:
        assert by[name].cfg.model.block == "gated"
        assert abs(by[name].params_non_embedding / by["sessa"].params_non_embedding - 1) <= 0.02


def test_ablation_is_sessa_without_feedback() -> None:
    by = {v.name: v for v in rc.load_family(ROOT / "recipes" / "lm_table2")}
    ref, abl = by["sessa"], by["sessa_nofb"]
    assert rc.is_feedback_ablation(ref.cfg, abl.cfg)
    d, n = ref.cfg.model.d_model, ref.cfg.model.n_layers
    assert ref.params_non_embedding - abl.params_non_embedding == n * (2 * d * d + 3 * d + 1)


def test_an_ablation_that_also_resizes_is_checked(tmp_path: pathlib.Path) -> None:
    fam = tmp_path / "fam"
    fam.mkdir()
    (fam / "base.yaml").write_text((ROOT / "recipes" / "tiny" / "base.yaml").read_text())
    (fam / "sessa.yaml").write_text("base: base.yaml\nmodel:\n  mixer: sessa\n")
    (fam / "sessa_nofb.yaml").write_text("base: base.yaml\nmodel:\n  mixer: sessa\n"
                                         "  d_model: 96\n  sessa:\n    feedback: false\n"
                                         "run:\n  name: x\n")
    assert any("non-embedding parameters" in p for p in rc.problems(fam))
