#!/usr/bin/env bash
# On the lent GPU: start-up of the all-plugins engine (load + verify, build the
# model, capture the decode graphs) with a cold and then a warm Triton cache.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
WORK=/dev/shm/glm; mkdir -p $WORK
step python3 build.py --output_dir $WORK/all --dtype float16 --max_batch_size 8 --max_input_len 2048 --max_output_len 512 \
  --random_seed 0 --log_level warning --use_gpt_attention_plugin float16 --use_layernorm_plugin float16 \
  --use_gemm_plugin float16 --enable_context_fmha_fp32_acc
for cache in cold warm; do
  step python3 benchmark.py --engine_dir $WORK/all --batch_size 1 --input_len 128 --output_len 8 --repeats 1 \
    --output_json "$OUT/startup_$cache.json"
done
