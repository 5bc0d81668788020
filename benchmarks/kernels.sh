#!/usr/bin/env bash
# On the lent GPU: the kernel tests on real hardware (bfloat16 included, which the
# CPU interpreter cannot check), the context-FMHA sweep against SDPA and the
# skinny-GEMM sweep (1 and 8 rows, timed inside CUDA graphs) and the skinny GEMM against
# cuBLAS, tinygemm and gemlite (carried as a wheel in .whl/). Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/common.sh"
step python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py
step python3 benchmarks/check_context_fmha_gpu.py --json "$OUT/context_fmha_sweep.json"
step python3 benchmarks/tune_gemv.py 1 8 --json "$OUT/gemv_sweep.json"
step python3 benchmarks/gemv_libraries.py --rows 1 8 --json "$OUT/gemv_libraries.json"
