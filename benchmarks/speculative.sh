#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's speculative decoding table. A dummy ChatGLM2-6B
# all-plugins engine built with --max_draft_len 15: a verify step of 2, 4, 8 and 16
# tokens against a decode step (batch 1 and 8, 1024 cached tokens; verify_cost.py),
# then benchmark.py's decode at batch 1 with and without prompt lookup on random
# weights (what a model that does not copy costs).
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
grep -h "^===\|^glm_engine\|decode\|verify" "$OUT/log.txt"
