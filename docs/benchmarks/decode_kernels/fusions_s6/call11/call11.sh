#!/bin/bash
# Session 6 call 11: the fp16 all-plugins engine (A+L+G+F32) with its linears on the mma GEMM: A (tree) / B (57c73fe,
# Triton GEMV + cuBLAS qkv), A B, accuracy, A B.
set -uo pipefail
source benchmarks/common.sh
build_all_plugins_engine "$WORK/fp16" | grep -v "^===" | tail -3
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
run_ab() {
  python3 benchmark.py --engine_dir "$WORK/fp16" "${B[@]}" --output_json "$OUT/fp16_A$1.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/A$1 /"
  (cd /tmp/base_57c73fe && python3 benchmark.py --engine_dir "$WORK/fp16" "${B[@]}" --output_json "$OUT/fp16_B$1.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/B$1 /")
}
run_ab 1
python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json "$OUT/acc_fp16.json" 2>&1 | grep -i "relative\|rror"
run_ab 2
