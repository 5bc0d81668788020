#!/usr/bin/env bash
# On the lent GPU (a fresh machine): start-up of the all-plugins engine — load and
# verify, build the network, capture the decode graphs — with a cold and then a
# warm Triton cache, for the engine as build.py writes it on a GPU (its kernels
# compiled at build, kernels/) and for the same engine without them (as built on a
# machine without a GPU). Each engine gets a Triton cache of its own, empty at first.
set -uo pipefail
source "$(dirname "$0")/common.sh"
start=$(date +%s.%N)
build_all_plugins_engine "$WORK/all"
echo "build.py took $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s; the engine's kernels: $(du -sh "$WORK/all/kernels" | cut -f1)," \
  "$(python3 -c "import json; print(len(json.load(open('$WORK/all/kernels.json'))['files']))") files" | tee -a "$OUT/log.txt"
cp -r "$WORK/all" "$WORK/plain" && rm -rf "$WORK/plain/kernels" "$WORK/plain/kernels.json"
for engine in plain all; do
  rm -rf "/tmp/triton_$engine"
  for cache in cold warm; do
    TRITON_CACHE_DIR=/tmp/triton_$engine step python3 benchmark.py --engine_dir "$WORK/$engine" --batch_size 1 \
      --input_len 128 --output_len 8 --repeats 1 --output_json "$OUT/startup_${engine}_$cache.json"
  done
done
grep -h "^===\|start-up\|kernels" "$OUT/log.txt"
