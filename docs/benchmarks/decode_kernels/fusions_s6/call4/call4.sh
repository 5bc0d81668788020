#!/bin/bash
# Paths as stored: /tmp/base_<rev> and /tmp/variant_<name> are `git archive <rev>` trees (call 4: variants.txt;
# call 5: variant_pre_release = 666513e), made beside the run; the scratch scripts sit next to this file.
# Session 6 call 4: early trigger of the next kernel (griddepcontrol.launch_dependents right after the wait):
# base (HEAD 9491107) vs v1 (Triton kernels trigger), v2 (Triton + mma), v3 (mma only); int4 then int8 engines.
set -uo pipefail
source benchmarks/common.sh
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
for bits in int4 int8; do
  build_engine "$WORK/$bits" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $bits | grep -v "^===" | tail -3
  for round in 1 2; do
    for v in base v1 v2 v3; do
      dir=.; [ $v != base ] && dir=/tmp/variant_$v
      (cd $dir && python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" --output_json "$OUT/${bits}_${v}_$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/$bits $v$round /")
    done
  done
  rm -rf "$WORK/$bits"
done
