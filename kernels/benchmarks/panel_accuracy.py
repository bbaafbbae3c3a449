"""Accuracy of the Triton feedback solve variants on the GPU accuracy cases (bf16 inputs, float64
dense reference on the bf16-rounded inputs, as kernels/tests/test_triton_gpu.py): the relative
error of s, dq_b, dk_b, dgamma and df for each variant, then the largest over the cases.

Variants: solve queue | panel (``model.sessa.solve``; both compute r and dgamma from the stored
s and u). Run on the GPU:

    PYTHONPATH=$PWD:$PWD/kernels python3 kernels/benchmarks/panel_accuracy.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _helpers import feedback_inputs, rel_err, value_and_grads
from sessa_kernels.triton_feedback import feedback_triton

from sessa_pt.models.feedback import feedback_dense

NAMES = ("s", "dq_b", "dk_b", "dgamma", "df")
VARIANTS = {"queue": {"solve": "queue"}, "panel": {"solve": "panel"}}


def parse_case(text: str) -> tuple[tuple[int, int, int, int], str]:
    *dims, routing = text.split(",")
    B, T, Dk, D = (int(x) for x in dims)
    return (B, T, Dk, D), routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="2,63,64,96,sharp;2,1000,256,256,sharp;"
                    "2,4096,64,128,sharp;2,63,64,96,diffuse",
                    help="B,T,Dk,D,routing;... (T <= 4096: dense float64 reference)")
    ap.add_argument("--device", default="cuda",
                    help="cpu: Triton's interpreter (TRITON_INTERPRET=1; tiny cases only)")
    ap.add_argument("--dtype", default="bfloat16",
                    help="input dtype (the interpreter's dot takes float16, not bfloat16)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for text in args.cases.split(";"):
        (B, T, Dk, D), routing = parse_case(text)
        q, k, g, f, ds = feedback_inputs(B, T, Dk, D, routing=routing, dtype=dtype,
                                         device=args.device, seed=T + D)
        ref = value_and_grads(feedback_dense, *(x.double() for x in (q, k, g, f, ds)))
        for variant, kw in VARIANTS.items():
            out = value_and_grads(lambda *a, kw=kw: feedback_triton(*a, **kw), q, k, g, f, ds)
            row = {"case": f"B{B}-T{T}-Dk{Dk}-D{D}-{routing}", "variant": variant}
            row.update({n: rel_err(x, r) for n, x, r in zip(NAMES, out, ref, strict=True)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = f"{'case':>24} {'variant':>20} " + " ".join(f"{n:>9}" for n in NAMES)
    print("\n" + head)
    for r in rows:
        print(f"{r['case']:>24} {r['variant']:>20} "
              + " ".join(f"{r[n]:9.2e}" for n in NAMES))
    print(f"\nlargest over the cases (bound 1e-2)\n{'variant':>20} "
          + " ".join(f"{n:>9}" for n in NAMES))
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        print(f"{variant:>20} " + " ".join(f"{max(r[n] for r in mine):9.2e}" for n in NAMES))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
