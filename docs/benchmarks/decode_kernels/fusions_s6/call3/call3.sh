#!/bin/bash
# Paths as stored: /tmp/base_<rev> and /tmp/variant_<name> are `git archive <rev>` trees (call 4: variants.txt;
# call 5: variant_pre_release = 666513e), made beside the run; the scratch scripts sit next to this file.
# Session 6 call 3: bulk-copy (TMA) weight streaming in the mma kernel. GPU tests (both kernels), micro sweep,
# int4 engine A (tree, TMA) / B (9491107, registers) A B A B, int4 accuracy.
set -uo pipefail
source benchmarks/common.sh
step timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_weight_only_mma.py 2>&1 | tail -4
timeout 200 python3 docs/benchmarks/decode_kernels/fusions_s6/call3/tma_micro.py 2>&1 | tee $OUT/tma_micro.txt
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
for bits in int4; do
  build_engine "$WORK/$bits" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $bits | grep -v "^===" | tail -3
  for round in 1 2; do
    python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" --output_json "$OUT/${bits}_A$round.json" 2>&1 | grep "glm_engine\|rror\|start\|linears" | sed "s/^/A$round /"
    (cd /tmp/base_9491107 && python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" --output_json "$OUT/${bits}_B$round.json" 2>&1 | grep "glm_engine\|rror\|start" | sed "s/^/B$round /")
  done
  python3 benchmark.py --engine_dir "$WORK/$bits" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json "$OUT/acc_$bits.json" 2>&1 | grep -i "relative\|rror"
done
