#!/usr/bin/env bash
# On the lent GPU: the per-flag latency tables of docs/PERFORMANCE.md. Dummy
# ChatGLM2-6B fp16 engines (reference path; all plugins A+L+G+F32; int8 and int4
# weight-only with the attention and layernorm plugins) at batch 1 and 8, 1024
# tokens in and 64 out, HF eager in the same run; prefill of 2048 tokens; logits
# against GlmForCausalLM in float32 (quantized engines: against the fp16 weights).
set -uo pipefail
source "$(dirname "$0")/common.sh"
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
build_all_plugins_engine "$WORK/all"
step python3 benchmark.py --engine_dir "$WORK/all" "${B[@]}" --hf --accuracy --output_json "$OUT/all.json"
step python3 benchmark.py --engine_dir "$WORK/all" --batch_size 1 --input_len 2048 --output_len 8 \
  --output_json "$OUT/prefill2048_all.json"
build_engine "$WORK/ref"
step python3 benchmark.py --engine_dir "$WORK/ref" "${B[@]}" --output_json "$OUT/ref.json"
rm -rf "$WORK/ref"
for precision in int8 int4; do
  build_engine "$WORK/$precision" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
    --weight_only_precision $precision
  step python3 benchmark.py --engine_dir "$WORK/$precision" "${B[@]}" --accuracy --reference_engine_dir "$WORK/all" \
    --output_json "$OUT/$precision.json"
  rm -rf "$WORK/$precision"
done
