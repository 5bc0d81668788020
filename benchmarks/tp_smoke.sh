#!/usr/bin/env bash
# On a lent 4-GPU host: a tiny plugin engine (CUDA graphs, NCCL inside them) at 1, 2
# and 4 ranks gives the same greedy tokens through run.py; then the all-reduce
# microbenchmark at 2 and 4 GPUs. Ranks are started by hand under a time limit, so
# that a hang dumps every rank's Python stack (faulthandler on SIGABRT).
set -uo pipefail
source "$(dirname "$0")/common.sh"
TINY=(--n_layer 2 --n_embd 256 --n_head 8 --multi_query_group_num 2 --inter_size 512 --vocab_size 4096
      --dtype float16 --max_batch_size 4 --max_input_len 64 --max_output_len 32 --log_level warning)
printf '11,12,13,14,15\n7,8\n100,200,300,400,500,600,700,800\n5\n' > "$WORK/prompts.csv"
ranks() {  # ranks N SECONDS command...: N local ranks, each killed with SIGABRT after SECONDS
  local n=$1 limit=$2; shift 2
  for ((r = 0; r < n; r++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n \
      timeout -s ABRT "$limit" python3 -X faulthandler "$@" > "$OUT/rank$r.out" 2> "$OUT/rank$r.err" &
  done
  wait
  for ((r = 0; r < n; r++)); do echo "--- rank $r"; tail -c 3000 "$OUT/rank$r.err"; done
  cat "$OUT/rank0.out" | tail -5
}
for n in 1 2 4; do
  echo "=== TP$n"
  timeout 120 python3 build.py --output_dir "$WORK/tiny$n" "${TINY[@]}" --world_size $n --use_inflight_batching \
    --use_gemm_plugin float16 --use_layernorm_plugin float16 2>&1 | tail -3
  ranks $n 120 run.py --engine_dir "$WORK/tiny$n" --input_tokens "$WORK/prompts.csv" --max_output_len 24 \
    --output_csv "$OUT/tiny$n.csv" --log_level info
done
for n in 2 4; do cmp "$OUT/tiny1.csv" "$OUT/tiny$n.csv" && echo "TP$n tokens == TP1 tokens"; done
for n in 2 4; do echo "=== all-reduce $n"; ranks $n 100 benchmarks/allreduce_gpu.py; cat "$OUT/rank0.out"; done
