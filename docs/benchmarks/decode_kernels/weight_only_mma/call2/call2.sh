#!/bin/bash
source benchmarks/common.sh
python3 .ab/s5/sweep.py $OUT/sweep.json 4 8 2>&1 | tee $OUT/sweep.txt
