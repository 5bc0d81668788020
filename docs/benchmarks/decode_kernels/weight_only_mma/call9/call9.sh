#!/bin/bash
# Session 5 call 9: int8 on the tensor-core GEMM. GPU tests, memcheck, per-shape micro (int8, int4), int8 library
# table, int8 engine A (this tree) / B (ce22fb7: int8 on the Triton GEMV) A B A B, int8 accuracy.
set -uo pipefail
source benchmarks/common.sh
step python3 -m pytest -q -p no:cacheprovider tests/test_weight_only_mma.py 2>&1 | tail -2
timeout 150 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -q -p no:cacheprovider \
  tests/test_weight_only_mma.py -k "dequantize or every_launch" > $OUT/memcheck.txt 2>&1; echo "memcheck rc $?"; tail -4 $OUT/memcheck.txt
python3 .ab/s5/mma_micro.py 2>&1 | tee $OUT/mma_micro.txt
step python3 benchmarks/gemv_libraries.py --rows 1 8 --kinds int8 --json $OUT/gemv_libraries_int8.json 2>&1 | grep -v "^{" | tail -8
make_variant .ab/s5/prev_glm_engine
build_engine "$WORK/int8" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int8 > /dev/null
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/int8" "${B[@]}" --output_json "$OUT/int8_A$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/A$round /"
  (cd /tmp/variant && python3 benchmark.py --engine_dir "$WORK/int8" "${B[@]}" --output_json "$OUT/int8_B$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/B$round /")
done
step python3 benchmark.py --engine_dir "$WORK/int8" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json "$OUT/acc_int8.json" 2>&1 | grep -i "relative\|rror"
