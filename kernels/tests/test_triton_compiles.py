"""Every Triton kernel, at the launches training makes, compiles for sm90 on this CPU machine
(triton_launches.py says how). The interpreter tests check the kernels' arithmetic; this one
checks what only Triton's compiler sees: types across loops, shared memory, ptxas."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_launches.py")
KERNEL_MODULES = sorted(Path(__file__).resolve().parents[1].glob("sessa_kernels/_*kernels.py"))


def _public_kernels() -> set[tuple[str, str]]:
    """(module, name) of every @triton.jit function not named _private (the device helpers)."""
    found = set()
    for path in KERNEL_MODULES:
        for name in re.findall(r"^@triton\.jit\s*\ndef (\w+)", path.read_text(), re.MULTILINE):
            if not name.startswith("_"):
                found.add((f"sessa_kernels.{path.stem}", name))
    return found


def test_every_kernel_launch_compiles_for_sm90(tmp_path: Path) -> None:
    launches = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    rec = subprocess.run([sys.executable, str(SCRIPT), "record", str(launches)], env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-3000:]
    seen = {(x["module"], x["kernel"]) for x in json.loads(launches.read_text())}
    assert _public_kernels() <= seen, f"never launched here: {sorted(_public_kernels() - seen)}"
    out = subprocess.run([sys.executable, str(SCRIPT), "compile", str(launches)], env=env, check=False,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, "\n".join(
        line for line in out.stdout.splitlines() if not line.startswith("ok")) + out.stderr[-3000:]
