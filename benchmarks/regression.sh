#!/usr/bin/env bash
# On the lent GPU: the current tree against another checkout (BASELINE, e.g. the
# commit before a refactor, carried as a directory) in one call, on the same
# engines (built by the current tree; both read the same engine format):
#   decode:  A+L+G+F32 at batch 1 and 8, int8 weight-only at batch 1 (1024 in, 64 out)
#   serving: the 512-request throughput run
# HF eager runs once, on the current tree's side. Usage: regression.sh BASELINE decode|serving
set -uo pipefail
source "$(dirname "$0")/common.sh"
baseline=$(cd "$1" && pwd); part=$2; here=$(pwd)
measure() {  # measure SIDE DIR ARGS...: benchmark.py of the tree in DIR
  local side=$1 dir=$2; shift 2
  (cd "$dir" && step python3 benchmark.py "$@" --output_json "$OUT/${side}.json")
}
if [ "$part" = decode ]; then
  build_all_plugins_engine "$WORK/all"
  build_engine "$WORK/int8" "${PLUGINS[@]}" --use_weight_only --weight_only_precision int8
  for side in baseline current; do
    dir=$here; [ $side = baseline ] && dir=$baseline
    hf=(); [ $side = current ] && hf=(--hf)
    measure "${side}_all" "$dir" --engine_dir "$WORK/all" --batch_size 1 8 --input_len 1024 --output_len 64 "${hf[@]}"
    measure "${side}_int8" "$dir" --engine_dir "$WORK/int8" --batch_size 1 --input_len 1024 --output_len 64
  done
else
  build_inflight_engine "$WORK/ifb"
  for side in baseline current; do
    dir=$here; [ $side = baseline ] && dir=$baseline
    hf=(); [ $side = current ] && hf=(--hf --hf_num_requests 128 --hf_batch_size 32)
    measure "${side}_serving" "$dir" --engine_dir "$WORK/ifb" --mode throughput --num_requests 512 \
      --input_len_range 400 800 --output_len 100 "${hf[@]}"
  done
fi
