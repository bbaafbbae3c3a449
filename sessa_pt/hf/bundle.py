"""The model code an export carries: our own modules, copied verbatim with only their imports
rewritten, so an exported directory runs where sessa_pt is not installed and still runs exactly
the code that trained the model (one implementation, no port to keep in sync).

transformers loads remote code by copying the modeling file and every file it imports
*relatively* (``from .x import y``, found by a regex on the source) into its module cache, and it
checks that the modeling file's absolute imports are installed. So every bundled module becomes a
flat file ``<dotted name with _>.py`` beside the modeling file, and each import of one of our
modules becomes a relative import of that file:

    from sessa_pt.models.rope import apply_rope
        ->  from .sessa_pt_models_rope import apply_rope
    from sessa_kernels import _fb_kernels as kern
        ->  from . import sessa_kernels__fb_kernels as kern

The second form is invisible to transformers' regex, so :func:`copy_hints` lists every bundled
file in a ``TYPE_CHECKING`` block of the modeling file (never executed, but seen by the regex).
The Triton kernels are bundled too and are only imported when a Triton path runs (CUDA), so
loading on a machine without Triton works. The bundled kernel modules define their custom
operators under a namespace of their own copy (``sessa_kernels.oplib``): an export loaded where
sessa_pt is installed, or beside another export, leaves the other copies' operators in place.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from dataclasses import dataclass

# The roots of our code that model modules may import; anything else must be a third-party
# package (torch, triton).
OUR_ROOTS = ("sessa_pt", "sessa_kernels", "sessa_data")
ENTRY = "sessa_pt.models.lm"


def file_name(module: str) -> str:
    """The flat file a bundled module becomes (without .py)."""
    return module.replace(".", "_")


@dataclass
class _Import:
    node: ast.ImportFrom | ast.Import
    modules: list[str]        # our modules this statement needs


def _is_ours(name: str) -> bool:
    return name.split(".")[0] in OUR_ROOTS


def _module_path(module: str) -> pathlib.Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module}")
    return pathlib.Path(spec.origin)


def _is_package_module(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _our_imports(tree: ast.Module, module: str) -> list[_Import]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(_is_ours(a.name) for a in node.names):
                raise ValueError(f"{module}: `import {node.names[0].name}` of our own code is not "
                                 "supported by the export bundler; use `from X import Y`")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and _is_ours(node.module):
            if _is_package_module(node.module):
                # from package import submodule [as alias]: each name must be a submodule
                mods = []
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if importlib.util.find_spec(sub) is None:
                        raise ValueError(f"{module} line {node.lineno}: `from {node.module} "
                                         f"import {a.name}` takes a name from a package's "
                                         "__init__; import it from its own module instead")
                    mods.append(sub)
                found.append(_Import(node, mods))
            else:
                found.append(_Import(node, [node.module]))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise ValueError(f"{module}: relative imports are not supported by the bundler")
    return found


def _rewrite(node: ast.ImportFrom, package_form: bool) -> str:
    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}"
                      for a in node.names)
    if package_form:
        return "from . import " + ", ".join(
            file_name(f"{node.module}.{a.name}") + (f" as {a.asname}" if a.asname else
                                                    f" as {a.name}") for a in node.names)
    return f"from .{file_name(node.module)} import {names}"


def rewrite_module(module: str) -> tuple[str, list[str]]:
    """The bundled source of ``module`` and the modules of ours it imports."""
    src = _module_path(module).read_text()
    lines = src.splitlines(keepends=True)
    tree = ast.parse(src)
    imports = _our_imports(tree, module)
    needed: list[str] = []
    # Replace statements bottom-up so line numbers stay valid.
    for imp in sorted(imports, key=lambda i: i.node.lineno, reverse=True):
        node = imp.node
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][:node.col_offset]
        tail = lines[last][node.end_col_offset:]
        new = indent + _rewrite(node, _is_package_module(node.module)) + tail
        lines[first:last + 1] = [new if new.endswith("\n") else new + "\n"]
        needed.extend(imp.modules)
    return "".join(lines), needed


def bundle_sources(entry: str = ENTRY) -> dict[str, str]:
    """{file name: source} for ``entry`` and every module of ours it imports, transitively
    (lazy imports inside functions included)."""
    out: dict[str, str] = {}
    todo, seen = [entry], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        src, needed = rewrite_module(module)
        out[file_name(module) + ".py"] = src
        todo.extend(needed)
    return dict(sorted(out.items()))


def copy_hints(files: list[str]) -> str:
    """A block for the modeling file that names every bundled file in the import form
    transformers detects (see the module docstring); it never runs."""
    lines = ["", "", "# Every bundled file, in the `from .x import` form transformers looks for",
             "# when it copies remote code into its module cache (some are imported as",
             "# `from . import x`). Never executed.",
             "if TYPE_CHECKING:"]
    lines += [f"    from .{f[:-3]} import *  # noqa: F401,F403" for f in files]
    return "\n".join(lines) + "\n"
