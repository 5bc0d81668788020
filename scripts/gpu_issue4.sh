#!/usr/bin/env bash
# On the lent GPU: the in-flight batching engine (dummy ChatGLM2-6B fp16,
# max_batch_size 256) in the throughput and request-rate modes with HF eager
# static batches as the baseline of the same run; then the all-plugins engine
# (static batches through the same scheduler) and the int4 engine re-measured.
# Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
WORK=/dev/shm/glm; mkdir -p $WORK
t() { local s=$SECONDS; "$@"; echo "took $((SECONDS - s)) s: $2 $3" | tee -a "$OUT/log.txt"; }
t build_inflight_engine $WORK/ifb
t step python3 benchmark.py --engine_dir $WORK/ifb --mode throughput --num_requests 512 --input_len_range 400 800 \
  --output_len 100 --hf --hf_num_requests 128 --hf_batch_size 32 --output_json "$OUT/throughput.json"
t step python3 benchmark.py --engine_dir $WORK/ifb --mode rate --request_rate 40 --num_requests 1000 \
  --input_len_range 16 1024 --output_len 100 --output_json "$OUT/rate.json"
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 2048 --max_output_len 512 --random_seed 0 --log_level warning
        --use_gpt_attention_plugin float16 --use_layernorm_plugin float16 --enable_context_fmha_fp32_acc)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
rm -rf $WORK/ifb
t step python3 build.py --output_dir $WORK/all "${COMMON[@]}" --use_gemm_plugin float16
t step python3 benchmark.py --engine_dir $WORK/all "${B[@]}" --hf --output_json "$OUT/all_scheduler.json"
t step python3 build.py --output_dir $WORK/int4 "${COMMON[@]}" --use_weight_only --weight_only_precision int4
t step python3 benchmark.py --engine_dir $WORK/int4 "${B[@]}" --accuracy --output_json "$OUT/int4_join.json"
