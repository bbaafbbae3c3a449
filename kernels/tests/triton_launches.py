"""Every Triton kernel launch of sessa_kernels, compiled for Hopper without a GPU.

The interpreter tests (TRITON_INTERPRET=1) run the kernels' Python, not Triton's code generator:
type errors of the compiled kernel (a loop-carried variable that changes type, say), shared
memory beyond the GPU's, or a ptxas failure only show on a GPU. This script closes that gap in
two steps, each in its own process (the interpreter switch is read once, at import):

    python kernels/tests/triton_launches.py record LAUNCHES.json
        runs the public kernel entry points (feedback solve forward and backward, decode read,
        SSD forward and backward, fused cross-entropy) under the interpreter at small T but at
        the block sizes training uses, and writes each distinct launch: kernel, argument types,
        constexpr values, warps and stages;
    python kernels/tests/triton_launches.py compile LAUNCHES.json
        compiles every recorded launch with Triton's own compiler for sm90 (down to a cubin,
        with the ptxas that ships in the triton wheel) and fails when one does not compile or
        needs more shared memory than an H100/H200 block can have.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SM90_MAX_SHARED = 232448          # bytes of shared memory one block may use on sm90 (227 KiB)
_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
           "torch.int64": "i64", "torch.int32": "i32", "torch.bool": "i1", "torch.uint8": "u8"}


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def _exercise() -> None:
    """One call of each entry point per setting that changes the generated code."""
    from functools import partial

    import torch

    kernels = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(kernels), str(kernels.parent)]
    from sessa_kernels.ce_triton import cross_entropy_grad_triton_
    from sessa_kernels.decode import feedback_decode_step
    from sessa_kernels.ssd_triton import ssd_triton
    from sessa_kernels.triton_feedback import feedback_triton

    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    def fwd_bwd(fn, *inputs):
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.ones_like(o) for o in outs if o.requires_grad])

    # the feedback solve: Dk 64 and D 128 give the training block sizes (BK 64, BD 128).
    # panel_rows = block_m: several super-chunks (every panel kernel). Every solve at the
    # default 64-row chunks; at 128 rows the queue (the most shared memory) and the inverse
    # (the largest register tiles); float32 inputs once. Each launch costs seconds of compiler
    # time (ptxas about half), so the set is kept to the ones that differ.
    settings = [(torch.bfloat16, 64, solve) for solve in ("panel", "panel_inverse", "queue")]
    settings += [(torch.bfloat16, 128, "panel_inverse"), (torch.bfloat16, 128, "queue"),
                 (torch.float32, 64, "panel")]
    for dtype, bm, solve in settings:
        T = 2 * bm + 5
        q, k, f = randn(1, T, 64, dtype=dtype), randn(1, T, 64, dtype=dtype), \
            randn(1, T, 128, dtype=dtype)
        g = (torch.rand(1, T, generator=gen) * 1.9 - 0.95).to(dtype).requires_grad_()
        fwd_bwd(partial(feedback_triton, block_m=bm, solve=solve, panel_rows=bm), q, k, g, f)
    for P in (0, 70):
        feedback_decode_step(randn(2, 64, dtype=torch.bfloat16).detach(),
                             torch.rand(2).to(torch.bfloat16), randn(2, 768).detach(),
                             randn(2, P, 64, dtype=torch.bfloat16).detach(),
                             randn(2, P, 768, dtype=torch.bfloat16).detach(), impl="triton")
    # the SSD at the m125 head width and state size, with and without an initial state
    for dtype in (torch.bfloat16, torch.float32):
        for init in (False, True):
            x, B, C = randn(1, 70, 4, 64, dtype=dtype), randn(1, 70, 2, 128, dtype=dtype), \
                randn(1, 70, 2, 128, dtype=dtype)
            dt = (torch.rand(1, 70, 4, generator=gen) * 0.1).requires_grad_()
            A = (-torch.rand(4, generator=gen)).requires_grad_()
            h0 = randn(1, 4, 64, 128) if init else None
            fwd_bwd(partial(ssd_triton, chunk_size=64, initial_state=h0), x, dt, A, B, C)
    logits = torch.randn(4, 50_000, generator=gen).to(torch.bfloat16)
    cross_entropy_grad_triton_(logits, torch.tensor([1, 2, -100, 4]), torch.ones(4))


def record(path: Path) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        constexpr = set(_constexpr_params(self.fn))
        launch = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                  "signature": {n: "constexpr" if n in constexpr else _arg_type(bound[n])
                                for n in self.arg_names},
                  "constexprs": {n: bound[n] for n in self.arg_names if n in constexpr},
                  "options": options}
        seen.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    _exercise()
    path.write_text(json.dumps(sorted(seen.values(), key=lambda x: json.dumps(x, sort_keys=True)),
                               indent=1))
    print(f"{len(seen)} distinct launches of "
          f"{len({(x['module'], x['kernel']) for x in seen.values()})} kernels -> {path}")


def _constexpr_params(fn) -> list[str]:
    import inspect

    import triton.language as tl

    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"]


def _compile_one(launch: dict) -> tuple[str, int | None, str]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = list(launch["signature"])
    constexprs = {(names.index(n),): v for n, v in launch["constexprs"].items()}
    label = f"{launch['kernel']}{launch['constexprs']}{launch['options']}"
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=launch["signature"],
                                          constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as e:  # noqa: BLE001 - any compiler error is reported with its launch
        return label, None, f"{type(e).__name__}: {e}"
    return label, kernel.metadata.shared, ""


def compile_all(path: Path) -> int:
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile runs Triton's compiler: unset TRITON_INTERPRET")
    kernels = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(kernels), str(kernels.parent)]
    launches = json.loads(path.read_text())
    failures = []
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for label, shared, error in pool.map(_compile_one, launches):
            if error:
                failures.append(f"{label}: does not compile: {error}")
            elif shared > SM90_MAX_SHARED:
                failures.append(f"{label}: needs {shared} bytes of shared memory, sm90 has "
                                f"{SM90_MAX_SHARED}")
            else:
                print(f"ok  shared {shared:>6}  {label}")
    for line in failures:
        print("FAIL", line)
    print(f"{len(launches) - len(failures)} of {len(launches)} launches compile for sm90")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("record", "compile"):
        raise SystemExit("usage: triton_launches.py record|compile LAUNCHES.json")
    if sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    else:
        sys.exit(compile_all(Path(sys.argv[2])))
