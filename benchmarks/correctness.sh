#!/usr/bin/env bash
# On the lent GPU: the plugin engine's greedy tokens with and without CUDA graphs
# against the reference engine of the same weights, and every engine's decode
# steps against GlmForCausalLM in float32 (fp16 all plugins, int8, int4).
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_engine "$WORK/ref"
build_all_plugins_engine "$WORK/all"
step python3 benchmarks/check_plugins_gpu.py "$WORK/ref" "$WORK/all"
rm -rf "$WORK/ref"
for precision in int8 int4; do
  build_engine "$WORK/$precision" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only \
    --weight_only_precision $precision
done
step python3 benchmarks/check_decode_gpu.py "$WORK/all" "$WORK/int8" "$WORK/int4"
