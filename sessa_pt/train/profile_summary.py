"""GPU kernel time of a training profile by kind of kernel, as a markdown table:
``python -m sessa_pt.train.profile_summary PROFILE.txt [PROFILE.txt ...]``.

Reads the torch.profiler tables that ``SESSA_PT_PROFILE`` writes (``profile_rank0.txt``, see
:mod:`sessa_pt.train.profiling`). Only kernel rows count (operator rows such as ``aten::mm``
or ``sessa::feedback_triton_bwd`` hold their kernels' time again); a kernel listed twice (the
table repeats inductor's kernels under their graph) counts once. The kinds are matched on the
kernel name, first match wins; "other" is the rest of the total.
"""

from __future__ import annotations

import argparse
import pathlib
import re

KINDS = (
    ("Sessa feedback, dq/dk (Triton)", r"^bwd_(dqdk|dlogit)"),
    ("Sessa feedback, solves (Triton)", r"^(fwd|bwd)_(panel_|solve)"),
    ("Mamba2 SSD (Triton)", r"^(chunk_state_fwd|state_pass_|chunk_scan_fwd|chunk_d)"),
    ("fused cross-entropy (Triton)", r"^ce_grad_rows"),
    ("GEMM off the sm90 path (align1/2, sm75, sm80)", r"align1|align2|cutlass_75|cutlass_80"),
    ("GEMM sm90", r"nvjet|sm90_xmma|cutlass3x_sm90|gemm"),
    ("attention (cuDNN / flash)", r"cudnn_generated|flash|fmha"),
    ("inductor fused kernels", r"^triton_"),
    ("eager elementwise, copy, reduce", r"^void at::native|^void \(anonymous|elementwise"),
    ("communication (NCCL)", r"nccl"),
)
_TIME = re.compile(r"^([\d.]+)(us|ms|s)$")
_SCALE = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_OPERATOR = ("aten::", "sessa::", "autograd::", "Optimizer.", "ProfilerStep", "cuda",
             "Torch-Compiled", "CompiledFunction", "##", "Memcpy", "Memset", "Activity")


def kernel_times(path: pathlib.Path) -> tuple[dict[str, float], float]:
    """Self CUDA ms of every kernel row, and the table's "Self CUDA time total"."""
    text = path.read_text()
    total = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)", text)
    if total is None:
        raise SystemExit(f"{path}: no 'Self CUDA time total' line: not a profiler table")
    header = next((ln for ln in text.splitlines() if "Self CUDA" in ln and "Name" in ln), None)
    if header is None:
        raise SystemExit(f"{path}: no header row with 'Self CUDA'")
    col = re.split(r"\s{2,}", header.strip()).index("Self CUDA")
    kernels: dict[str, float] = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) <= col or not (m := _TIME.match(cells[col])):
            continue
        name = cells[0]
        if name.startswith(_OPERATOR) or name in kernels:
            continue
        kernels[name] = float(m.group(1)) * _SCALE[m.group(2)]
    return kernels, float(total.group(1)) * _SCALE[total.group(2)]


def summarise(path: pathlib.Path) -> list[tuple[str, float, float]]:
    kernels, total = kernel_times(path)
    sums = dict.fromkeys([k for k, _ in KINDS], 0.0)
    for name, ms in kernels.items():
        for kind, pattern in KINDS:
            if re.search(pattern, name):
                sums[kind] += ms
                break
    rows = [(k, v, 100 * v / total) for k, v in sums.items()]
    other = total - sum(sums.values())
    return rows + [("other", other, 100 * other / total), ("all", total, 100.0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="+", type=pathlib.Path)
    args = ap.parse_args(argv)
    for path in args.profiles:
        rows = summarise(path)
        print(f"\n{path}\n\n| kernels | GPU ms | share |\n|---|---|---|")
        for kind, ms, share in rows:
            print(f"| {kind} | {ms:.1f} | {share:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
