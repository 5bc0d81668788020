#!/usr/bin/env bash
# On the lent GPU (a fresh machine): start-up of the all-plugins engine — load and
# verify, build the network, capture the decode graphs — with a cold and then a
# warm Triton cache.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_all_plugins_engine "$WORK/all"
for cache in cold warm; do
  step python3 benchmark.py --engine_dir "$WORK/all" --batch_size 1 --input_len 128 --output_len 8 --repeats 1 \
    --output_json "$OUT/startup_$cache.json"
done
