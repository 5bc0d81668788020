#!/bin/bash
source benchmarks/common.sh
python3 .ab/s5/mma_bench.py $OUT/mma.json 2>&1 | tee $OUT/mma.txt | grep -v "^   "
