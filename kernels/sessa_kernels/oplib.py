"""Where the kernels' PyTorch custom operators are defined: each at most once per process.

``torch.library.custom_op`` *replaces* an operator whose qualified name is defined again: it
destroys the first definition's registration while the first CustomOpDef, and every OpOverload
handed out from it, still holds a handle to the freed dispatcher entry. The next call through the
old object reads freed memory (``MemoryError: std::bad_alloc`` or a segfault, depending on the
heap). A second definition happens whenever a second copy of these modules is imported: an
export carries them as flat files for transformers' remote code (``sessa_pt.hf.bundle``), so
loading an export in a process where sessa_pt is installed, or loading two exports, redefined
``sessa::*`` and broke the installed package's ops (and the first export's).

So each copy gets its own namespace: ``sessa`` for the installed ``sessa_kernels`` package (the
names profiles and docs show), ``sessa_<digest>`` for any other copy, the digest of its module
name and source. An operator already defined under its name (the same module executed again) is
reused, never defined twice.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable

import torch

INSTALLED_NAMESPACE = "sessa"


def namespace(module: str, source_file: str) -> str:
    """The operator namespace of the module ``module`` (its ``__name__``) at ``source_file``."""
    if module.startswith("sessa_kernels."):
        return INSTALLED_NAMESPACE
    digest = hashlib.sha256(module.encode() + pathlib.Path(source_file).read_bytes())
    return f"{INSTALLED_NAMESPACE}_{digest.hexdigest()[:12]}"


def _defined(ns: str, name: str) -> bool:
    return hasattr(getattr(torch.ops, ns), name)


def define_op(module: str, source_file: str, name: str, fn: Callable, *, fake: Callable,
              backward: Callable | None = None, setup_context: Callable | None = None
              ) -> torch._ops.OpOverload:
    """Define ``fn`` (schema from its annotations, no mutated arguments) as the operator
    ``<namespace(module, source_file)>::<name>``, with its fake implementation and, if given,
    its autograd formula; return the operator. Defined once per process: a second call with
    the same module and source returns the existing operator."""
    ns = namespace(module, source_file)
    if not _defined(ns, name):
        qualname = f"{ns}::{name}"
        torch.library.custom_op(qualname, fn, mutates_args=())
        torch.library.register_fake(qualname, fake)
        if backward is not None:
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return getattr(getattr(torch.ops, ns), name).default
