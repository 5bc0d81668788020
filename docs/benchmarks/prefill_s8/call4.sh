#!/usr/bin/env bash
# session 8 call 4: short-prefill host analysis (random weights, 128 and 512 tokens); int4 and int8 decode
# benchmark + profile (int4 with --hf), GPU clocks logged throughout.
set -uo pipefail
source benchmarks/common.sh
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv,noheader -lms 250 > $OUT/smi.csv &
SMI=$!
(timeout 100 python3 .ab/s8/prefill_marks.py 1 128 2>&1; timeout 60 python3 .ab/s8/prefill_marks.py 1 512 2>&1 | head -40) \
  | grep -v "Warning\|_warn_once" | cut -c1-300 > $OUT/marks_short.txt
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
for name in int4 int8; do
  date +%T >> $OUT/log.txt
  build_engine "$WORK/$name" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $name
  extra=(); [ $name = int4 ] && extra=(--hf)
  step timeout 200 python3 benchmark.py --engine_dir "$WORK/$name" "${B[@]}" "${extra[@]}" --output_json "$OUT/${name}.json"
  step timeout 120 python3 benchmarks/profile_decode.py "$WORK/$name" --json "$OUT/profile_$name.json"
  rm -rf "$WORK/$name"
done
kill $SMI
grep -h "^===\|^glm_engine\|^hf_\|decode step\|launch gaps\|us a step\|^ *[0-9]" $OUT/log.txt | cut -c1-200 | tail -60
head -60 $OUT/marks_short.txt
