#!/usr/bin/env bash
# On the lent GPU: the in-flight batching tables of docs/PERFORMANCE.md. 512
# requests (inputs uniform 400-800 tokens, 100 out) submitted at once, with HF
# eager static batches of 32 as the baseline of the same run; then 1,000 requests
# (inputs 16-1024) arriving as a Poisson process of 40 requests/s.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_inflight_engine "$WORK/ifb"
step python3 benchmark.py --engine_dir "$WORK/ifb" --mode throughput --num_requests 512 --input_len_range 400 800 \
  --output_len 100 --hf --hf_num_requests 128 --hf_batch_size 32 --output_json "$OUT/throughput.json"
step python3 benchmark.py --engine_dir "$WORK/ifb" --mode rate --request_rate 40 --num_requests 1000 \
  --input_len_range 16 1024 --output_len 100 --output_json "$OUT/rate.json"
