#!/usr/bin/env bash
# On the lent GPU: the in-flight batching throughput run (default 16384 prompt
# tokens per step) with HF eager static batches as the baseline of the same run.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
WORK=/dev/shm/glm; mkdir -p $WORK
build_inflight_engine $WORK/ifb
step python3 benchmark.py --engine_dir $WORK/ifb --mode throughput --num_requests 512 --input_len_range 400 800 \
  --output_len 100 --hf --hf_num_requests 128 --hf_batch_size 32 --output_json "$OUT/throughput_final.json"
