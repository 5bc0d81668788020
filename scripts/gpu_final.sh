#!/usr/bin/env bash
# On the lent GPU: the kernel tests on real hardware (bfloat16 included), then an
# int8 weight-only engine and an all-plugins fp16 engine benchmarked with HF
# eager as the baseline of the same run. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
step python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0 --log_level warning
        --use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
step python3 build.py --output_dir "$WORK/int8" "${COMMON[@]}" --use_weight_only --weight_only_precision int8
step python3 benchmark.py --engine_dir "$WORK/int8" "${B[@]}" --hf --output_json "$OUT/final_int8.json"
