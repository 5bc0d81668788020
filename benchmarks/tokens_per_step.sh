#!/usr/bin/env bash
# On the lent GPU: the 512-request all-at-once serving run (inputs 400-800, 100 out)
# at three --max_tokens_per_step budgets, twice each, on the in-flight engine.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_inflight_engine "$WORK/ifb"
for round in 1 2; do
  for tps in 16384 32768 65536; do
    step python3 benchmark.py --engine_dir "$WORK/ifb" --num_requests 512 --input_len_range 400 800 --output_len 100 \
      --mode throughput --max_tokens_per_step $tps --output_json "$OUT/tps_${tps}_$round.json"
  done
done
grep -h "requests in\|steps:\|^=== python" "$OUT/log.txt"
