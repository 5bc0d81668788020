#!/usr/bin/env bash
# On the lent GPU: where a decode step's time goes (profile_decode.py, batch 1) on the
# dummy ChatGLM2-6B engines of decode.sh (fp16 A+L+G+F32, int8 and int4 weight-only
# with the attention and layernorm plugins), with their batch 1 and 8 latency (1024
# in, 64 out). With VARIANT_DIR (a copy of glm_engine/, e.g. the previous commit's),
# each engine's latency alternates this tree (A) and the variant (B), A B A B.
# ENGINES picks some of them (default "fp16 int8 int4").
# Usage: [ENGINES="int8 int4"] bash benchmarks/profile_decode.sh [VARIANT_DIR]
set -uo pipefail
VARIANT=${1:+$(realpath "$1")}
source "$(dirname "$0")/common.sh"
if [ -n "$VARIANT" ]; then
  make_variant "$VARIANT"
fi
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
for name in ${ENGINES:-fp16 int8 int4}; do
  if [ $name = fp16 ]; then
    build_all_plugins_engine "$WORK/$name"
  else
    build_engine "$WORK/$name" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
      --weight_only_precision $name
  fi
  rounds=1; [ -n "$VARIANT" ] && rounds=2
  for round in $(seq $rounds); do
    step python3 benchmark.py --engine_dir "$WORK/$name" "${B[@]}" --output_json "$OUT/${name}_A$round.json"
    if [ $rounds = 2 ]; then
      (cd /tmp/variant && step python3 benchmark.py --engine_dir "$WORK/$name" "${B[@]}" \
        --output_json "$OUT/${name}_B$round.json")
    fi
  done
  step python3 benchmarks/profile_decode.py "$WORK/$name" --json "$OUT/profile_$name.json"
  rm -rf "$WORK/$name"
done
grep -h "^===\|^glm_engine\|decode step\|launch gaps" "$OUT/log.txt"
