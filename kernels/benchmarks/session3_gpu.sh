#!/usr/bin/env bash
# One device run (one H200, at most ~7.2 minutes): GPU tests, the accuracy of the solve variants
# (panel scratch bf16 / fp32, r and dgamma from the stored or the float32 s and u), the decode
# step eager and replayed from CUDA graphs, and the layer benchmark with both panel scratches.
# From the repo root, packages installed, PYTHONPATH holding the repo and kernels/:
#   bash kernels/benchmarks/session3_gpu.sh [OUT_DIR]        (default /tmp/kern_out)
# Each part has its own time limit (seconds; TEST_S, ACC_S, DECODE_S, LAYER_S override them),
# so one hang cannot take the whole run; the limits add up to 430 s. Everything goes under
# OUT_DIR: logs, JSON, and the JSON rows of each part from its log as *.jsonl (kept also when
# a part is cut short). Prints the tables; status.txt holds each part's exit code.
set -u
OUT_DIR=${1:-/tmp/kern_out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
: "${TEST_S:=170}" "${ACC_S:=70}" "${DECODE_S:=75}" "${LAYER_S:=115}"
BENCH=kernels/benchmarks
T0=$(date +%s)

source "$(dirname "${BASH_SOURCE[0]}")/parts.sh"

: >"$OUT_DIR/status.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,memory.used --format=csv \
    | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT_DIR/gpu.txt"

# (a) all GPU tests (the panel fp32 scratch and the CUDA-graph decode test among them).
TAIL=40 part tests "$TEST_S" python3 -m pytest -m gpu kernels/tests -q -s -rxXfE -p no:cacheprovider

# (b) relative errors per tensor of queue / panel-bf16 / panel-fp32, stored=1 / stored=0, on
# the case over the bound (B2-T63-Dk64-D96-sharp) and three more; the largest per variant.
TAIL=40 part accuracy "$ACC_S" python3 $BENCH/panel_accuracy.py --json "$OUT_DIR/accuracy.json"

# (c) decode step at P = 1k..131k, B = 1 and 16: eager and CUDA-graph replay columns.
part decode "$DECODE_S" python3 $BENCH/bench_sessa_layer.py --seq '' \
    --decode 1024,8192,32768,131072 --decode-batch 1,16 --json "$OUT_DIR/decode.json"

# (c) layer fwd+bwd: attention, queue, panel with bf16 and with fp32 tiles.
part layers "$LAYER_S" python3 $BENCH/bench_sessa_layer.py --seq 2048,8192,32768 \
    --impls attention,triton,triton_panel,triton_panel_fp32 --decode '' \
    --json "$OUT_DIR/layers.json"

echo
echo "=== done in $(( $(date +%s) - T0 )) s; part exit codes (124/137: time limit):"
cat "$OUT_DIR/status.txt"
ls -l "$OUT_DIR"
