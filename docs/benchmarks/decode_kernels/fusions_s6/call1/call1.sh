#!/bin/bash
# Paths as stored: /tmp/base_<rev> and /tmp/variant_<name> are `git archive <rev>` trees (call 4: variants.txt;
# call 5: variant_pre_release = 666513e), made beside the run; the scratch scripts sit next to this file.
# Session 6 call 1: fused norm/SwiGLU GEMMs. GPU tests, micro, int4 engine A (tree) / B (0f09d1d) A B A B, accuracy.
set -uo pipefail
source benchmarks/common.sh
step python3 -m pytest -q -p no:cacheprovider -x tests/test_weight_only_mma.py 2>&1 | tail -3
python3 docs/benchmarks/decode_kernels/fusions_s6/call1/fuse_micro.py 2>&1 | tee $OUT/fuse_micro.txt
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 | tail -3
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json "$OUT/int4_A$round.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/A$round /"
  (cd /tmp/base_0f09d1d && python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json "$OUT/int4_B$round.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/B$round /")
done
step python3 benchmark.py --engine_dir "$WORK/int4" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json "$OUT/acc_int4.json" 2>&1 | grep -i "relative\|rror"
