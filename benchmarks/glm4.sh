#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's GLM-4 table. Dummy GLM-4-9B engines
# (--model_name glm_4_9b): fp16 A+L+G+F32 and int4 A+L+F32+W4 at batch 1 and 8 (1024
# in, 64 out) with their weight-streaming floors (decode_floor.py), HF eager and the
# logits against GlmForCausalLM in float32 in the same run; the 512-request serving run
# with HF eager static batches; GLM-4-9B-0414's logits against Glm4ForCausalLM.
set -uo pipefail
source "$(dirname "$0")/common.sh"
G=(--model_name glm_4_9b --dtype float16 --max_batch_size 8 --max_input_len 2048 --max_output_len 512 --random_seed 0
   --log_level warning)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
step python3 build.py --output_dir "$WORK/g4" "${G[@]}" "${PLUGINS[@]}" --use_gemm_plugin float16 \
  --enable_context_fmha_fp32_acc
step python3 build.py --output_dir "$WORK/g4i4" "${G[@]}" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc \
  --use_weight_only --weight_only_precision int4
step python3 benchmarks/decode_floor.py "$WORK/g4" "$WORK/g4i4"
step python3 benchmark.py --engine_dir "$WORK/g4" "${B[@]}" --hf --accuracy --output_json "$OUT/g4_fp16.json"
step python3 benchmark.py --engine_dir "$WORK/g4i4" "${B[@]}" --accuracy --reference_engine_dir "$WORK/g4" \
  --output_json "$OUT/g4_int4.json"
rm -rf "${WORK:?}/g4" "${WORK:?}/g4i4"
step python3 build.py --output_dir "$WORK/g4ifb" --model_name glm_4_9b --dtype float16 --max_batch_size 256 \
  --max_input_len 1024 --max_output_len 512 --random_seed 0 --log_level warning --use_inflight_batching \
  --use_layernorm_plugin float16 --use_gemm_plugin float16
step python3 benchmark.py --engine_dir "$WORK/g4ifb" --mode throughput --num_requests 512 --input_len_range 400 800 \
  --output_len 100 --hf --hf_num_requests 128 --hf_batch_size 32 --output_json "$OUT/g4_serving.json"
rm -rf "${WORK:?}/g4ifb"
step python3 build.py --output_dir "$WORK/g0414" --model_name glm_4_9b_0414 --dtype float16 --max_batch_size 1 \
  --max_input_len 512 --max_output_len 16 --random_seed 0 --log_level warning "${PLUGINS[@]}" --use_gemm_plugin float16
step python3 benchmark.py --engine_dir "$WORK/g0414" --batch_size 1 --input_len 256 --output_len 8 --accuracy \
  --output_json "$OUT/g0414.json"
grep -h "glm_engine\|hf_eager\|relative error\|floor\|copy rate" "$OUT/log.txt" | grep -v "^benchmark.py:"
