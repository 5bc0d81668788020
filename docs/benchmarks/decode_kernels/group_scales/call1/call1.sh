#!/usr/bin/env bash
# scratch (session 4, call 1): kernel tests on the H100 (group scales), gemv_libraries rows 1 8 with ours g128.
set -uo pipefail
source benchmarks/common.sh
(time timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15) > $OUT/kernel_tests.txt 2>&1
cat $OUT/kernel_tests.txt
(time timeout 330 python3 benchmarks/gemv_libraries.py --rows 1 8 --json $OUT/gemv_libraries.json) > $OUT/gemv_libraries.txt 2>&1
grep -A40 "per layer us" $OUT/gemv_libraries.txt; tail -4 $OUT/gemv_libraries.txt
