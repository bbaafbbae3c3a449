"""Each copy of the kernel modules defines its own operators, once: a second copy (what an
export's bundled files are) never replaces the installed package's (``sessa_kernels.oplib``).
Replacing them left the installed ops' handles pointing at freed dispatcher memory."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from sessa_kernels import chunked, oplib
from torch._library.custom_ops import OPDEFS  # torch's registry of custom ops (test only)

SRC = pathlib.Path(chunked.__file__)


def _exec_copy(name: str):
    """Execute chunked.py again as module ``name`` (as transformers runs an export's files)."""
    spec = importlib.util.spec_from_file_location(name, SRC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _defined_by(qualname: str) -> str:
    return OPDEFS[qualname]._init_fn.__module__


def test_a_copy_gets_its_own_namespace_and_leaves_the_installed_ops_alone() -> None:
    before = {q: OPDEFS[q] for q in ("sessa::feedback_chunked_fwd", "sessa::feedback_chunked_bwd")}
    copy = _exec_copy("exported_copy.sessa_kernels_chunked")
    ns = oplib.namespace("exported_copy.sessa_kernels_chunked", str(SRC))
    assert ns != oplib.INSTALLED_NAMESPACE and ns.startswith("sessa_")
    assert copy.feedback_chunked_fwd.name() == f"{ns}::feedback_chunked_fwd"
    for qualname, opdef in before.items():
        assert OPDEFS[qualname] is opdef and _defined_by(qualname) == "sessa_kernels.chunked"
    # the same copy executed again reuses its operators instead of defining them twice
    again = _exec_copy("exported_copy.sessa_kernels_chunked")
    assert again.feedback_chunked_fwd is copy.feedback_chunked_fwd
    assert _defined_by(f"{ns}::feedback_chunked_fwd") == "exported_copy.sessa_kernels_chunked"
    # both the installed and the copied operator still run, with the same result and gradients
    gen = torch.Generator().manual_seed(0)
    q, k, f = (torch.randn(2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.rand(2, 9, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    outs = []
    for module in (chunked, copy):
        leaves = [x.clone().requires_grad_() for x in (q, k, g, f)]
        s = module.feedback_chunked(*leaves, chunk_size=4)
        s.square().sum().backward()
        outs.append([s.detach(), *(x.grad for x in leaves)])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_installed_namespace_is_stable() -> None:
    assert oplib.namespace("sessa_kernels.chunked", str(SRC)) == "sessa"
    assert chunked.feedback_chunked_fwd.name() == "sessa::feedback_chunked_fwd"
