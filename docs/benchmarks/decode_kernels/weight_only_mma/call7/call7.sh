#!/bin/bash
# Session 5 call 7: the library table with the int4 mma GEMM, and the Hugging Face baseline on the int4 engine.
set -uo pipefail
source benchmarks/common.sh
step python3 benchmarks/gemv_libraries.py --rows 1 8 --kinds int4 --json $OUT/gemv_libraries_int4.json 2>&1 | grep -v "^{" | tail -14
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 > /dev/null
step python3 benchmark.py --engine_dir "$WORK/int4" --batch_size 1 8 --input_len 1024 --output_len 64 --hf --output_json "$OUT/int4_hf.json" 2>&1 | grep -v "it/s" | tail -8
