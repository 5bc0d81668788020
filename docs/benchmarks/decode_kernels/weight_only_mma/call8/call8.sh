#!/bin/bash
# Session 5 call 8 (2 GPUs): a tiny int4 engine at 1 and 2 ranks on the tensor-core GEMM: greedy tokens through run.py.
set -uo pipefail
source benchmarks/common.sh
TINY=(--n_layer 2 --n_embd 256 --n_head 8 --multi_query_group_num 2 --inter_size 512 --vocab_size 4096
      --dtype float16 --max_batch_size 4 --max_input_len 64 --max_output_len 32 --log_level warning
      --use_weight_only --weight_only_precision int4 --use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
printf '11,12,13,14,15\n7,8\n100,200,300,400,500,600,700,800\n5\n' > "$WORK/prompts.csv"
for n in 1 2; do
  echo "=== TP$n"
  timeout 120 python3 build.py --output_dir "$WORK/tiny$n" "${TINY[@]}" --world_size $n 2>&1 | tail -3
  for ((r = 0; r < n; r++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n \
      timeout -s ABRT 120 python3 -X faulthandler run.py --engine_dir "$WORK/tiny$n" --input_tokens "$WORK/prompts.csv" \
      --max_output_len 24 --output_csv "$OUT/tiny$n.csv" --log_level info > "$OUT/rank$r.out" 2> "$OUT/rank$r.err" &
  done
  wait
  grep -h "int4 linears\|rror" "$OUT"/rank*.err | sort | uniq -c
  tail -3 "$OUT/rank0.out"
done
cmp "$OUT/tiny1.csv" "$OUT/tiny2.csv" && echo "TP2 tokens == TP1 tokens"
head -c 600 "$OUT/tiny1.csv"; echo; head -c 600 "$OUT/tiny2.csv"
