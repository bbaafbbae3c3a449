"""Publishing a GPU call's files into results/ and the marked RESULTS.md section."""

from __future__ import annotations

import json
import pathlib

import pytest

from sessa_pt.experiments import publish as pub
from tests.experiments.test_results import _summary


def test_replace_section_appends_then_replaces() -> None:
    once = pub.replace_section("# Results\n\nintro\n", "mqar_diffuse", "first")
    assert once.endswith("<!-- experiment:mqar_diffuse -->\nfirst\n"
                         "<!-- /experiment:mqar_diffuse -->\n")
    twice = pub.replace_section(once + "\ntail\n", "mqar_diffuse", "second")
    assert "first" not in twice and "second" in twice and twice.endswith("tail\n")
    assert twice.startswith("# Results\n\nintro\n")


def test_publish_seeds_and_sweep(tmp_path: pathlib.Path) -> None:
    src, root = tmp_path / "out", tmp_path / "repo"
    src.mkdir()
    root.mkdir()
    (root / "RESULTS.md").write_text("# Results\n")
    (src / "summary.json").write_text(json.dumps(_summary()))
    (src / "choice.json").write_text(json.dumps({"chosen": {"sessa": 1e-3}}))
    (src / "loss_vs_tokens.png").write_bytes(b"png")
    dest = pub.publish("mqar_diffuse", src, root)
    assert json.loads((dest / "choice.json").read_text())["chosen"] == {"sessa": 1e-3}
    assert (dest / "loss_vs_tokens.png").read_bytes() == b"png"
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["plots"] == ["results/mqar_diffuse/loss_vs_tokens.png"]
    top = (root / "RESULTS.md").read_text()
    assert "<!-- experiment:mqar_diffuse -->" in top and "| 0.6000 ± 0.1000 |" in top
    assert (dest / "RESULTS.md").read_text() in top
    with pytest.raises(SystemExit, match="neither summary.json nor choice.json"):
        pub.publish("mqar_diffuse", tmp_path / "empty", root)
