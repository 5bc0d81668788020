#!/usr/bin/env bash
# On the lent GPU: the kernel tests on real hardware (bfloat16 included), then the
# skinny-GEMM sweep (1, 2 and 8 rows) and the context-FMHA sweep against SDPA.
# Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
step python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py
step python3 scripts/check_context_fmha_gpu.py --json "$OUT/context_fmha_sweep.json"
step python3 scripts/tune_gemv.py 1 8 --json "$OUT/gemv_sweep.json"
