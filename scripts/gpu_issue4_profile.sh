#!/usr/bin/env bash
# On the lent GPU: the throughput run of gpu_issue4.sh split into steps that carry
# prompt tokens and decode-only steps, at 8192 and 16384 prompt tokens per step.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
WORK=/dev/shm/glm; mkdir -p $WORK
build_inflight_engine $WORK/ifb
for tokens in 8192 16384; do
  step python3 benchmark.py --engine_dir $WORK/ifb --mode throughput --num_requests 512 --input_len_range 400 800 \
    --output_len 100 --max_tokens_per_step $tokens --output_json "$OUT/throughput_split_$tokens.json"
done
