#!/usr/bin/env bash
# scratch (session 4, call 5): swiglu kernel tests on the GPU; gemv_libraries int4 (ours per channel and g128 against
# tinygemm and gemlite g128) at 1 and 8 rows; profile of the int4 engine's decode step at batch 1 (SwiGLU fused).
set -uo pipefail
source benchmarks/common.sh
(timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "swiglu" 2>&1 | tail -3) > $OUT/kernel_tests.txt 2>&1
cat $OUT/kernel_tests.txt
timeout 120 python3 benchmarks/gemv_libraries.py --rows 1 8 --kinds int4 --json $OUT/gemv_libraries_int4.json > $OUT/gemv_libraries_int4.txt 2>&1
grep -A12 "per layer us" $OUT/gemv_libraries_int4.txt
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 > /dev/null
timeout 100 python3 benchmarks/profile_decode.py "$WORK/int4" --json $OUT/profile_int4.json > $OUT/profile_int4.txt 2>&1
head -30 $OUT/profile_int4.txt
