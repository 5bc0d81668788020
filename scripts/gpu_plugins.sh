#!/usr/bin/env bash
# On the lent GPU: dummy ChatGLM2-6B fp16 engines without and with the plugins;
# checks agreement, then benchmarks both (graphs on and off) with HF eager as
# the baseline of the same run. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0 --log_level warning)
step python3 build.py --output_dir "$WORK/ref" "${COMMON[@]}"
step python3 build.py --output_dir "$WORK/plug" "${COMMON[@]}" --use_gpt_attention_plugin float16 --use_layernorm_plugin float16
step python3 scripts/check_plugins_gpu.py "$WORK/ref" "$WORK/plug"
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
step python3 benchmark.py --engine_dir "$WORK/plug" "${B[@]}" --accuracy --hf --output_json "$OUT/plugins_graphs.json"
step python3 benchmark.py --engine_dir "$WORK/plug" "${B[@]}" --no_cuda_graphs --output_json "$OUT/plugins_eager.json"
step python3 benchmark.py --engine_dir "$WORK/ref" "${B[@]}" --output_json "$OUT/reference.json"
