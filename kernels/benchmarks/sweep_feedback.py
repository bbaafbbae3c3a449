"""Time the Triton feedback solve alone (fwd, fwd+bwd) for several block shapes, D=Dk=1024,
bf16, beside the dense and chunked paths where they fit. GPU only:

    PYTHONPATH=$PWD:$PWD/kernels python3 kernels/benchmarks/sweep_feedback.py
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import torch
from cuda_timing import median_ms
from sessa_kernels.triton_feedback import feedback_triton

D = 1024


def main() -> None:
    configs = [(64, 128), (64, 256)]
    print(f"{'B':>3} {'T':>6} {'bm':>4} {'bd':>4} {'fwd ms':>9} {'fwd+bwd ms':>11} "
          f"{'fwd TFLOP/s':>12}")
    for B, T in ((2, 8192), (1, 32768)):
        q, k = (torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = (torch.rand(B, T, device="cuda") * 1.98 - 0.99).bfloat16()
        f = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, g, f)]
        ds = torch.randn_like(f)
        for bm, bd in configs:
            def fwd(bm=bm, bd=bd):
                with torch.no_grad():
                    feedback_triton(*leaves, block_m=bm, block_d=bd)

            def fwdbwd(bm=bm, bd=bd):
                feedback_triton(*leaves, block_m=bm, block_d=bd).backward(ds)
            try:
                tf, tb = median_ms(fwd, 5), median_ms(fwdbwd, 3)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next shape
                print(B, T, bm, bd, "failed:", type(exc).__name__, str(exc)[:200])
                continue
            useful = 2.0 * B * T * T * D   # causal half of (q k^T) and (alpha s): 2 * T^2/2 * D * 2
            print(f"{B:3d} {T:6d} {bm:4d} {bd:4d} {tf:9.2f} {tb:11.2f} {useful / tf / 1e9:12.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
