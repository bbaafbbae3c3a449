#!/usr/bin/env bash
# Optional extra wheel for the device machine: fla-core (flash-linear-attention's pure-Triton
# ops, ~1.1 MB; its one dependency, einops, is on the GPU image). With it installed,
# tests/gpu/test_mamba2_gpu.py::test_fla_ssd_forward_matches_reference runs, and
# model.mamba2.impl=auto takes fla where triton >= 3.7.1 (the image's triton 3.6 keeps our
# Triton SSD: fla refuses its backward there, fla#640). Run here, from the repo root, next to
# ../shared/gpu/wheels.sh (which fills .whl/ with the project's own dependencies):
#   bash kernels/benchmarks/gpu_wheels.sh
# Nothing else is needed by sessa_pt/train/bench_baselines_gpu.sh.
set -euo pipefail
FLA_CORE=${FLA_CORE:-0.6.0}     # keep equal to the pin of the `fla` extra in pyproject.toml
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp -d .whl "fla-core==$FLA_CORE"
ls -l .whl
