#!/usr/bin/env bash
# On the lent GPU: the quantization matrix against fp16 in one run. For each scheme of
# SCHEMES (default all): a dummy ChatGLM2-6B engine (A+L+F32 plus the scheme's flags;
# fp16 adds G), decode at batch 1 and 8 (1024 in, 64 out), a 2048-token prefill, logits
# against GlmForCausalLM in float32 and the drift from the fp16 engine; with SERVING=1
# also the 512-request in-flight run of each scheme's in-flight engine, whose log gives
# the KV pool's tokens. SCHEMES picks some: fp16 fp8 smoothquant int4_g128 int4_awq
# fp8_kv int8_kv. Usage: [SCHEMES="fp16 fp8"] [SERVING=1] bash benchmarks/quantization.sh
set -uo pipefail
source "$(dirname "$0")/common.sh"
declare -A FLAGS=(
  [fp16]="--use_gemm_plugin float16"
  [fp8]="--enable_fp8"
  [smoothquant]="--smoothquant 0.5 --per_channel --per_token"
  [int4_g128]="--use_weight_only --weight_only_precision int4 --weight_only_group_size 128"
  [int4_awq]="--use_weight_only --weight_only_precision int4_awq"
  [fp8_kv]="--use_gemm_plugin float16 --fp8_kv_cache"
  [int8_kv]="--use_gemm_plugin float16 --int8_kv_cache"
)
SCHEMES=${SCHEMES:-fp16 fp8 smoothquant int4_g128 int4_awq fp8_kv int8_kv}
[ -d "$WORK/fp16" ] || build_engine "$WORK/fp16" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc ${FLAGS[fp16]}
for name in $SCHEMES; do
  [ "$name" = fp16 ] || build_engine "$WORK/$name" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc ${FLAGS[$name]}
  step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 8 --input_len 1024 --output_len 64 \
    --output_json "$OUT/${name}_decode.json"
  step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 --input_len 2048 --output_len 1 \
    --output_json "$OUT/${name}_prefill.json"
  step python3 benchmark.py --engine_dir "$WORK/$name" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 \
    --accuracy --reference_engine_dir "$WORK/fp16" --output_json "$OUT/${name}_drift.json"
  if [ "${SERVING:-0}" = 1 ]; then
    build_inflight_engine "$WORK/${name}_ifb" ${FLAGS[$name]/--use_gemm_plugin float16/}
    step python3 benchmark.py --engine_dir "$WORK/${name}_ifb" --mode throughput --num_requests 512 \
      --input_len_range 400 800 --output_len 100 --output_json "$OUT/${name}_serving.json"
    rm -rf "${WORK:?}/${name}_ifb"
  fi
  [ "$name" = fp16 ] || rm -rf "${WORK:?}/$name"
done
grep -h "^===\|^glm_engine\|relative\|KV cache" "$OUT/log.txt"
