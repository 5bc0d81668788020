#!/usr/bin/env bash
# On the lent GPU: dummy ChatGLM2-6B fp16 engines with all plugins, and with
# int8 / int4 weight-only; benchmarks each (CUDA graphs on) with HF eager as the
# baseline of the same run. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0 --log_level warning
        --use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
step python3 build.py --output_dir "$WORK/all" "${COMMON[@]}" --use_gemm_plugin float16
step python3 benchmark.py --engine_dir "$WORK/all" "${B[@]}" --accuracy --hf --output_json "$OUT/all_plugins.json"
for precision in int8 int4; do
  step python3 build.py --output_dir "$WORK/$precision" "${COMMON[@]}" --use_weight_only --weight_only_precision $precision
  du -sb "$WORK/$precision/rank0.safetensors" "$WORK/all/rank0.safetensors" | tee -a "$OUT/log.txt"
  step python3 benchmark.py --engine_dir "$WORK/$precision" "${B[@]}" --accuracy --output_json "$OUT/weight_only_$precision.json"
done
