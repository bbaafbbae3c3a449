"""The export's model code is ours: every bundled module equals its source but for the imports
of our own modules, which become relative imports of bundled files."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest

from sessa_pt.hf.bundle import bundle_sources, copy_hints, file_name, rewrite_module


class _DropOurImports(ast.NodeTransformer):
    def visit_ImportFrom(self, node):
        ours = (node.level > 0 or (node.module or "").split(".")[0] in
                ("sessa_pt", "sessa_kernels"))
        return ast.Pass() if ours else node


def _normalized(src: str) -> str:
    return ast.dump(_DropOurImports().visit(ast.parse(src)))


def test_bundle_is_our_code_with_only_imports_rewritten():
    files = bundle_sources()
    expected = {"sessa_pt.models.lm", "sessa_pt.models.sessa", "sessa_pt.models.attention",
                "sessa_pt.models.mamba2", "sessa_pt.models.blocks", "sessa_pt.models.rope",
                "sessa_pt.models.feedback", "sessa_pt.models.config", "sessa_kernels.chunked",
                "sessa_kernels.decode", "sessa_kernels.triton_feedback",
                "sessa_kernels._decode_kernels", "sessa_kernels._fb_kernels",
                "sessa_kernels._fb_panel_kernels", "sessa_kernels.precision",
                "sessa_kernels.ce_triton", "sessa_kernels._ce_kernels",
                "sessa_kernels.ssd_triton", "sessa_kernels._ssd_kernels", "sessa_kernels.oplib"}
    assert set(files) == {file_name(m) + ".py" for m in expected}
    for module in expected:
        original = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
        bundled = files[file_name(module) + ".py"]
        assert _normalized(bundled) == _normalized(original), module
        for node in ast.walk(ast.parse(bundled)):     # no absolute import of ours is left
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in ("sessa_pt", "sessa_kernels"), module
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                assert node.module + ".py" in files, (module, node.module)
    hints = copy_hints(list(files))
    assert all(f"from .{f[:-3]} import" in hints for f in files)


def test_bundler_rejects_imports_from_a_package_init(tmp_path, monkeypatch):
    mod = tmp_path / "probe_mod.py"
    mod.write_text("from sessa_pt.models import DecoderLM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="its own module"):
        rewrite_module("probe_mod")
