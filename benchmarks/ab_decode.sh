#!/usr/bin/env bash
# On the lent GPU: decode latency of this tree (A) against a variant of its library
# (B: VARIANT_DIR, a copy of glm_engine/ with a change), on the dummy ChatGLM2-6B
# int8 and int4 weight-only engines of decode.sh, batch 1 and 8, 1024 in / 64 out,
# runs alternating A, B, A, B. Usage: bash benchmarks/ab_decode.sh VARIANT_DIR
set -uo pipefail
VARIANT=$(realpath "$1")
source "$(dirname "$0")/common.sh"
rm -rf /tmp/variant && mkdir -p /tmp/variant && cp -r . /tmp/variant/ && rm -rf /tmp/variant/glm_engine \
  && cp -r "$VARIANT" /tmp/variant/glm_engine
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
for precision in int8 int4; do
  build_engine "$WORK/$precision" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
    --weight_only_precision $precision
  for round in 1 2; do
    step python3 benchmark.py --engine_dir "$WORK/$precision" "${B[@]}" --output_json "$OUT/${precision}_A$round.json"
    (cd /tmp/variant && step python3 benchmark.py --engine_dir "$WORK/$precision" "${B[@]}" \
      --output_json "$OUT/${precision}_B$round.json")
  done
  rm -rf "$WORK/$precision"
done
grep -h "^===\|^glm_engine" "$OUT/log.txt"
