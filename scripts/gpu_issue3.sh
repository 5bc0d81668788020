#!/usr/bin/env bash
# On the lent GPU: dummy ChatGLM2-6B fp16 engines (reference; all plugins with
# context FMHA; int8 and int4 weight-only), built in /dev/shm; graphs-vs-eager
# agreement; one benchmark per docs/PERFORMANCE.md row with HF eager as the
# baseline of the same run; the int4 GEMV sweep. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
WORK=/dev/shm/glm; mkdir -p $WORK
step python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k "gemv or context"
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 2048 --max_output_len 512 --random_seed 0 --log_level warning)
PLUG=(--use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
t() { local s=$SECONDS; "$@"; echo "took $((SECONDS - s)) s: ${*: -1}" | tee -a "$OUT/log.txt"; }
t step python3 build.py --output_dir $WORK/ref "${COMMON[@]}"
t step python3 build.py --output_dir $WORK/all "${COMMON[@]}" "${PLUG[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc
step python3 scripts/check_plugins_gpu.py $WORK/ref $WORK/all
step python3 benchmark.py --engine_dir $WORK/all "${B[@]}" --hf --accuracy --output_json "$OUT/all_fmha32.json"
step python3 benchmark.py --engine_dir $WORK/all --batch_size 1 --input_len 2048 --output_len 8 --output_json "$OUT/prefill2048_fmha32.json"
step python3 benchmark.py --engine_dir $WORK/ref --batch_size 1 --input_len 2048 --output_len 8 --output_json "$OUT/prefill2048_ref.json"
step python3 benchmark.py --engine_dir $WORK/ref --batch_size 1 --input_len 1024 --output_len 64 --output_json "$OUT/ref_bs1.json"
for precision in int8 int4; do
  t step python3 build.py --output_dir $WORK/$precision "${COMMON[@]}" "${PLUG[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $precision
  step python3 benchmark.py --engine_dir $WORK/$precision "${B[@]}" --accuracy --reference_engine_dir $WORK/all --output_json "$OUT/$precision.json"
done
rm -rf $WORK/ref $WORK/int8 $WORK/int4
t step python3 build.py --output_dir $WORK/fp16acc "${COMMON[@]}" "${PLUG[@]}" --use_gemm_plugin float16 --enable_context_fmha
step python3 benchmark.py --engine_dir $WORK/fp16acc --batch_size 1 --input_len 2048 --output_len 8 --accuracy --output_json "$OUT/prefill2048_fmha16.json"
step python3 scripts/tune_gemv.py 1 8 --bits 4 --json "$OUT/gemv_sweep_int4.json"
