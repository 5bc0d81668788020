#!/usr/bin/env bash
# session 8 call 1: prefill host-time timeline (1x2048, 1x1024); GEMV library table (rows 1 8, all kinds).
set -uo pipefail
source benchmarks/common.sh
(timeout 150 python3 .ab/s8/prefill_timeline.py 1 2048 2>&1; timeout 100 python3 .ab/s8/prefill_timeline.py 1 1024 2>&1) \
  | grep -v Warning > $OUT/timeline.txt
timeout 330 python3 benchmarks/gemv_libraries.py --rows 1 8 --json $OUT/gemv_libraries.json > $OUT/gemv_libraries.txt 2>&1
cat $OUT/timeline.txt | cut -c1-400
tail -22 $OUT/gemv_libraries.txt
