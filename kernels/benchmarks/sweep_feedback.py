"""Time the Triton feedback solve alone (fwd, fwd+bwd), D=Dk=1024, bf16, 16k tokens per batch,
for several block shapes and both solve variants ("queue": scores recomputed per channel
block; "panel": scores once per super-chunk into a scratch panel). GPU only:

    PYTHONPATH=$PWD:$PWD/kernels python3 kernels/benchmarks/sweep_feedback.py \
        [--seq 2048,8192,32768] [--configs 64:128:queue,64:128:panel]
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse

import torch
from cuda_timing import median_ms
from sessa_kernels.triton_feedback import feedback_triton, panel_width

D, TOKENS = 1024, 16384


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", default="2048,8192,32768")
    ap.add_argument("--configs", default="64:128:queue,64:128:panel",
                    help="block_m:block_d:solve, comma separated")
    args = ap.parse_args()
    configs = [(int(a), int(b), c) for a, b, c in (x.split(":") for x in args.configs.split(","))]
    print(f"{'B':>3} {'T':>6} {'bm':>4} {'bd':>4} {'solve':>6} {'W':>6} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>11} {'fwd TFLOP/s':>12} {'bwd ms':>9}")
    res = {}
    for T in (int(t) for t in args.seq.split(",")):
        B = max(1, TOKENS // T)
        q, k = (torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = (torch.rand(B, T, device="cuda") * 1.98 - 0.99).bfloat16()
        f = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, g, f)]
        ds = torch.randn_like(f)
        for bm, bd, solve in configs:
            kw = {"block_m": bm, "block_d": bd, "solve": solve}

            def fwd():
                with torch.no_grad():
                    feedback_triton(*leaves, **kw)

            def fwdbwd():
                feedback_triton(*leaves, **kw).backward(ds)
            try:
                tf, tb = median_ms(fwd, 5), median_ms(fwdbwd, 3)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next shape
                print(B, T, bm, bd, solve, "failed:", type(exc).__name__, str(exc)[:200])
                continue
            res[(T, bm, bd, solve)] = (tf, tb)
            W = panel_width(B, T, bm, 2) if solve == "panel" else 0
            useful = 2.0 * B * T * T * D   # causal half of (q k^T) and (alpha s): 2 * T^2/2 * D * 2
            print(f"{B:3d} {T:6d} {bm:4d} {bd:4d} {solve:>6} {W:6d} {tf:9.2f} {tb:11.2f} "
                  f"{useful / tf / 1e9:12.1f} {tb - tf:9.2f}", flush=True)
    print("\npanel vs queue (same blocks): speed-up fwd, fwd+bwd")
    for (T, bm, bd, solve), (tf, tb) in res.items():
        base = res.get((T, bm, bd, "queue"))
        if solve == "panel" and base:
            print(f"T={T:6d} bm={bm} bd={bd}: fwd {base[0] / tf:5.2f}x  fwd+bwd "
                  f"{base[1] / tb:5.2f}x")


if __name__ == "__main__":
    main()
