#!/usr/bin/env bash
# On the lent GPU: `benchmark.py --accuracy` on the dummy ChatGLM2-6B engines of the
# decode tables (fp16 A+L+G+F32, int4 and int8 weight-only with the attention and
# layernorm plugins): the relative error of their logits against GlmForCausalLM in
# float32 on the same weights, from the prefill and from decode steps (batch 1: the
# decode graphs and kernels a single user gets), and the drift of int4 (per channel,
# and with --weight_only_group_size 128) from the unquantized fp16 engine's weights.
set -uo pipefail
source "$(dirname "$0")/common.sh"
A=(--batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy)
build_all_plugins_engine "$WORK/fp16"
step python3 benchmark.py --engine_dir "$WORK/fp16" "${A[@]}" --output_json "$OUT/acc_fp16.json"
for precision in int4 int8; do
  build_engine "$WORK/$precision" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
    --weight_only_precision $precision
  step python3 benchmark.py --engine_dir "$WORK/$precision" "${A[@]}" --output_json "$OUT/acc_$precision.json"
done
step python3 benchmark.py --engine_dir "$WORK/int4" "${A[@]}" --reference_engine_dir "$WORK/fp16" \
  --output_json "$OUT/acc_int4_drift.json"
build_engine "$WORK/int4_g128" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
  --weight_only_precision int4 --weight_only_group_size 128
step python3 benchmark.py --engine_dir "$WORK/int4_g128" "${A[@]}" --output_json "$OUT/acc_int4_g128.json"
step python3 benchmark.py --engine_dir "$WORK/int4_g128" "${A[@]}" --reference_engine_dir "$WORK/fp16" \
  --output_json "$OUT/acc_int4_g128_drift.json"
grep -h "^===\|logits relative" "$OUT/log.txt"
