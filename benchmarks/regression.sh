#!/usr/bin/env bash
# On the lent GPU: this tree (A) against another checkout (B, the BASELINE directory,
# e.g. `git worktree add /tmp/base COMMIT`, carried) on the same engines, built by the
# baseline (the current tree loads them), each measurement run B A B A:
#   decode:  fp16 A+L+G+F32, int8 and int4 A+L+F32+W8/W4 at batch 1 and 8 (1024 in, 64 out)
#   serving: the in-flight engine's 512-request throughput run
# ENGINES picks some of the decode engines (default "fp16 int8 int4"); SERVING=0 skips
# the serving run. Usage: [ENGINES=...] [SERVING=0] bash benchmarks/regression.sh BASELINE
set -uo pipefail
source "$(dirname "$0")/common.sh"
baseline=$(cd "$1" && pwd); here=$(pwd)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
measure() {  # measure NAME ARGS...: B A B A, each benchmark.py of its tree
  local name=$1; shift
  for round in 1 2; do
    (cd "$baseline" && step python3 benchmark.py "$@" --output_json "$OUT/${name}_B$round.json")
    step python3 benchmark.py "$@" --output_json "$OUT/${name}_A$round.json"
  done
}
for name in ${ENGINES:-fp16 int8 int4}; do
  if [ "$name" = fp16 ]; then
    (cd "$baseline" && build_all_plugins_engine "$WORK/$name")
  else
    (cd "$baseline" && build_engine "$WORK/$name" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
      --weight_only_precision "$name")
  fi
  measure "$name" --engine_dir "$WORK/$name" "${B[@]}"
  rm -rf "${WORK:?}/$name"
done
if [ "${SERVING:-1}" != 0 ]; then
  (cd "$baseline" && build_inflight_engine "$WORK/ifb")
  measure serving --engine_dir "$WORK/ifb" --mode throughput --num_requests 512 --input_len_range 400 800 --output_len 100
fi
grep -h "^===\|^glm_engine" "$OUT/log.txt"
