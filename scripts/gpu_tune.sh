#!/usr/bin/env bash
# On the lent GPU: the skinny-GEMM sweep (1 and 8 rows), timed inside CUDA graphs.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
step python3 scripts/tune_gemv.py 1 8 --json "$OUT/gemv_sweep.json"
