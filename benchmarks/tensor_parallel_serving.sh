#!/usr/bin/env bash
# On a lent 2- or 4-GPU host: docs/PERFORMANCE.md's 512-request workload (inputs 400-800
# tokens, 100 out, all at once) on the in-flight engine at 1 and 2 ranks, with HF
# eager static batches of 32 in the TP1 run.
set -uo pipefail
source "$(dirname "$0")/common.sh"
ranks() {  # ranks N SECONDS command... (as torchrun would start them, under a time limit)
  local n=$1 limit=$2; shift 2
  echo "=== $n rank(s): $*"
  for ((r = 0; r < n; r++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29513 RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n \
      timeout -s ABRT "$limit" python3 "$@" > "$OUT/rank$r.out" 2> "$OUT/rank$r.err" &
  done
  wait
  grep -v "it/s\]\|B/s\]" "$OUT/rank0.out" | tee -a "$OUT/log.txt"
  grep -h " error" "$OUT"/rank*.err | head -3
}
S=(--mode throughput --num_requests 512 --input_len_range 400 800 --output_len 100)
for n in ${TP_SIZES:-1 2}; do
  build_inflight_engine "$WORK/ifb$n" --world_size $n
  hf=(); [ $n -eq 1 ] && hf=(--hf --hf_num_requests 128 --hf_batch_size 32)
  ranks $n 200 benchmark.py --engine_dir "$WORK/ifb$n" "${S[@]}" "${hf[@]}" --output_json "$OUT/serving_tp$n.json"
  rm -rf "$WORK/ifb$n"
done
