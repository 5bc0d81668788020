#!/usr/bin/env bash
# scratch (session 4, call 2): gemv kernel tests (group scales per word, half2 with groups); tune int4 g128 at 1 and 8 rows.
set -uo pipefail
source benchmarks/common.sh
(time timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gemv or dequantize" 2>&1 | tail -15) > $OUT/kernel_tests.txt 2>&1
cat $OUT/kernel_tests.txt
timeout 390 python3 benchmarks/tune_gemv.py 1 8 --bits 4 --group_size 128 --json $OUT/tune_g128.json > $OUT/tune_g128.txt 2>&1
cat $OUT/tune_g128.txt
