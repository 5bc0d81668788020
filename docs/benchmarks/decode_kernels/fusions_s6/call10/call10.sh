#!/bin/bash
# Session 6 call 10: fp16 weights on the mma GEMM. GPU tests, per-shape micro and config sweep.
set -uo pipefail
source benchmarks/common.sh
step timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_weight_only_mma.py 2>&1 | tail -3
timeout 300 python3 docs/benchmarks/decode_kernels/fusions_s6/call10/fp16_micro.py $OUT/fp16_micro.json 2>&1 | tee $OUT/fp16_micro.txt
