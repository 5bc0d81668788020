#!/usr/bin/env bash
# scratch (session 4, call 3): the int4 part of benchmarks/accuracy.sh (fp16 reference engine, int4 per channel and
# g128: accuracy and drift), then decode speed of both int4 engines, A B A B.
set -uo pipefail
source benchmarks/common.sh
A=(--batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy)
build_all_plugins_engine "$WORK/fp16" > /dev/null
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 > /dev/null
build_engine "$WORK/int4_g128" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
  --weight_only_precision int4 --weight_only_group_size 128 > /dev/null
for round in 1 2; do
  for e in int4 int4_g128; do
    python3 benchmark.py --engine_dir "$WORK/$e" --batch_size 1 2 8 --input_len 1024 --output_len 64 \
      --output_json "$OUT/speed_${e}_$round.json" 2>&1 | grep glm_engine | sed "s/^/$e $round /"
  done
done
step python3 benchmark.py --engine_dir "$WORK/int4_g128" "${A[@]}" --output_json "$OUT/acc_int4_g128.json" > /dev/null
step python3 benchmark.py --engine_dir "$WORK/int4_g128" "${A[@]}" --reference_engine_dir "$WORK/fp16" \
  --output_json "$OUT/acc_int4_g128_drift.json" > /dev/null
step python3 benchmark.py --engine_dir "$WORK/int4" "${A[@]}" --reference_engine_dir "$WORK/fp16" \
  --output_json "$OUT/acc_int4_drift.json" > /dev/null
grep -h "^===\|logits relative" "$OUT/log.txt"
