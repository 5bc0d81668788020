#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's speculative decoding section. A dummy ChatGLM2-6B
# all-plugins engine built with --max_draft_len 15: a verify step of 2, 4, 8 and 16
# tokens against a decode step (batch 1 and 8, 1024 cached tokens; verify_cost.py), then
# benchmark.py's decode at batch 1 with and without prompt lookup on random weights (what a
# model that does not copy costs); the tiny model trained to copy, with and without prompt
# lookup (copying_speedup.py); the 512-request serving run both ways.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_engine "$WORK/spec" "${PLUGINS[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc --max_draft_len 15
for batch in 1 8; do
  step python3 benchmarks/verify_cost.py "$WORK/spec" --batch_size $batch --json "$OUT/verify_b$batch.json"
done
for flags in "" "--speculative_decoding_mode prompt_lookup"; do
  step python3 benchmark.py --engine_dir "$WORK/spec" --batch_size 1 --input_len 1024 --output_len 64 $flags
done
rm -rf "${WORK:?}/spec"
step python3 benchmarks/copying_speedup.py --device cuda --plugins
build_inflight_engine "$WORK/spec_ifb" --max_draft_len 4
for flags in "" "--speculative_decoding_mode prompt_lookup"; do
  step python3 benchmark.py --engine_dir "$WORK/spec_ifb" --mode throughput --num_requests 512 \
    --input_len_range 400 800 --output_len 100 $flags
done
rm -rf "${WORK:?}/spec_ifb"
grep -h "^===\|^glm_engine\|decode\|verify\|tok/s\|speculative\|identical" "$OUT/log.txt"
