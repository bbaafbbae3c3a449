#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, triton, numpy, sentencepiece and pytest but cannot
# reach a package registry (the H200 image: Python 3.12, x86_64): deepspeed, megatron-core,
# webdataset, mlflow-skinny and safetensors with their missing dependencies, into .whl/ at the
# repository root (ignored by git). Run on a machine with a registry, from the repo root:
#   bash kernels/benchmarks/gpu_wheels.sh            # project dependencies
#   FLA=1 bash kernels/benchmarks/gpu_wheels.sh      # also fla-core (model.mamba2.impl=fla/auto)
# On the GPU machine, with .whl/ copied along, install into a scratch folder and put the
# checkout on the path (the GPU scripts in kernels/benchmarks and sessa_pt/ do this themselves):
#   S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#     --upgrade --target $S .whl/*.whl && export PYTHONPATH=$S:$PWD:$PWD/kernels:$PWD/data_prep
# Versions follow pyproject.toml's pins. The image's TORCH_CUDA_ARCH_LIST=9.0a cannot be parsed
# by DeepSpeed's op builder, which is why the trainer uses torch's AdamW, not DeepSpeed's.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
dest="$root/.whl"
mkdir -p "$dest"
grep -qx '/.whl/' "$root/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$root/.git/info/exclude"
pin() { grep -oE "\"$1==[^\"]+\"" "$root/pyproject.toml" | head -1 | tr -d '"'; }
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
tmp=$(mktemp -d)
# DeepSpeed ships a source distribution only: a pure-Python wheel (its ops are JIT-built).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$tmp" "$(pin deepspeed)"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$(pin megatron-core)" \
  "$(pin webdataset)" "$(pin safetensors)" braceexpand hjson
# mlflow-skinny (no UI) at mlflow's pinned version, with its dependencies; none pulls torch.
mlflow=$(pin mlflow); python3 -m pip download -q "${plat[@]}" -d "$tmp" "mlflow-skinny==${mlflow#*==}"
[ "${FLA:-0}" = 1 ] && python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "$(pin fla-core)"
# Leave out what the image already has: two versions of one package break the install.
on_image='^(annotated_doc|anyio|attrs|certifi|charset_normalizer|click|cloudpickle|h11|idna|numpy|packaging|protobuf|pyyaml|PyYAML|requests|typing_extensions|urllib3|zipp|torch|tqdm|einops|msgpack|ninja|psutil|py_cpuinfo|nvidia_ml_py)-'
for w in "$tmp"/*.whl; do
  b=$(basename "$w")
  [[ $b =~ $on_image ]] || cp "$w" "$dest/"
done
rm -rf "$tmp"
du -sh "$dest"
