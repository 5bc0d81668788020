#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's FP8 table. Dummy ChatGLM2-6B engines, fp16
# A+L+G+F32 and FP8 (A+L+F32 --enable_fp8), alternating: decode at batch 1 and 8 (1024
# in, 64 out; batch 8's prefill is 8 x 1024 tokens), a 2048-token prefill, the FP8
# decode step's profile, and both engines' logits against GlmForCausalLM in float32.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_all_plugins_engine "$WORK/fp16"
build_engine "$WORK/fp8" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --enable_fp8
for round in 1 2; do
  for name in fp16 fp8; do
    step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 8 --input_len 1024 --output_len 64 \
      --output_json "$OUT/${name}_decode_$round.json"
    step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 --input_len 2048 --output_len 1 \
      --output_json "$OUT/${name}_prefill_$round.json"
  done
done
step python3 benchmarks/profile_decode.py "$WORK/fp8" --json "$OUT/profile_fp8.json"
for name in fp16 fp8; do
  step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 \
    --accuracy --output_json "$OUT/${name}_accuracy.json"
done
rm -rf "${WORK:?}/fp16" "${WORK:?}/fp8"
grep -h "^===\|^glm_engine\|decode step\|relative" "$OUT/log.txt"
