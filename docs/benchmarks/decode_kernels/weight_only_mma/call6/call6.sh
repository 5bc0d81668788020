#!/bin/bash
# Session 5 call 6: int4 mma GEMM launched with PDL. GPU tests, A (this tree) / B (cd79d38) A B A B, profile bs1.
set -uo pipefail
source benchmarks/common.sh
step python3 -m pytest -q -p no:cacheprovider tests/test_int4_mma.py 2>&1 | tail -3
make_variant .ab/s5/old_glm_engine
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 > /dev/null
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json "$OUT/int4_A$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/A$round /"
  (cd /tmp/variant && python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json "$OUT/int4_B$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/B$round /")
done
step python3 benchmarks/profile_decode.py "$WORK/int4" --json "$OUT/profile_int4.json" 2>&1 | grep -v Warn | head -14
