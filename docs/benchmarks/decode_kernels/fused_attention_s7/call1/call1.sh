#!/bin/bash
# Session 7 call 1: fused decode attention. Micro (per layer, old chain vs fused at several splits), GPU kernel
# tests, int4 engine A (tree) / B (ccd4838) A B A B, int4 accuracy.
set -uo pipefail
source benchmarks/common.sh
step timeout 150 python3 docs/benchmarks/decode_kernels/fused_attention_s7/attention_micro.py /tmp/base_ccd4838 "$OUT/attention_micro.json"
step timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_weight_only_mma.py 2>&1 | tail -4
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
bits=int4
build_engine "$WORK/$bits" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $bits | grep -v "^===" | tail -3
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" --output_json "$OUT/${bits}_A$round.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/$bits A$round /"
  (cd /tmp/base_ccd4838 && python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" --output_json "$OUT/${bits}_B$round.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/$bits B$round /")
done
python3 benchmark.py --engine_dir "$WORK/$bits" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json "$OUT/acc_$bits.json" 2>&1 | grep -i "relative\|rror"
