#!/usr/bin/env bash
# session 8 call 5: prompt graphs. GPU tests; fp16 A+L+G+F32 engine prefill A (this tree) / B (HEAD) at
# 16/128/512 tokens, 2048 A; --hf at 128; accuracy at 256; int4 decode A B A B (decode graphs reworked).
set -uo pipefail
source benchmarks/common.sh
make_variant .ab/s8/base/glm_engine
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv,noheader -lms 500 > $OUT/smi.csv &
SMI=$!
step timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_plugins.py tests/test_session.py -k "graph or session"
build_all_plugins_engine "$WORK/fp16"
E=$WORK/fp16
for len in 16 128 512; do
  step timeout 60 python3 benchmark.py --engine_dir $E --batch_size 1 --input_len $len --output_len 8 --output_json $OUT/fp16_A_$len.json
  (cd /tmp/variant && step timeout 60 python3 benchmark.py --engine_dir $E --batch_size 1 --input_len $len --output_len 8 --output_json $OUT/fp16_B_$len.json)
done
step timeout 60 python3 benchmark.py --engine_dir $E --batch_size 1 --input_len 2048 --output_len 8
step timeout 120 python3 benchmark.py --engine_dir $E --batch_size 1 8 --input_len 128 --output_len 16 --hf
step timeout 120 python3 benchmark.py --engine_dir $E --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy
rm -rf $E
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4
for round in 1 2; do
  step timeout 60 python3 benchmark.py --engine_dir $WORK/int4 --batch_size 1 8 --input_len 1024 --output_len 64
  (cd /tmp/variant && step timeout 60 python3 benchmark.py --engine_dir $WORK/int4 --batch_size 1 8 --input_len 1024 --output_len 64)
done
step timeout 60 python3 benchmark.py --engine_dir $WORK/int4 --batch_size 1 --input_len 128 --output_len 8
kill $SMI
grep -h "^===\|^glm_engine\|^hf_\|passed\|failed\|error\|start-up\|relative" $OUT/log.txt | cut -c1-220
