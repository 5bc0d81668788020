#!/bin/bash
# Session 7 call 5 (final tree): prefill profile at 2048; fp16 A+L+G+F32 prefill 2048 A (tree) / B (ccd4838) with 7
# repeats; int4 decode A/B A B A B and the Hugging Face baseline.
set -uo pipefail
source benchmarks/common.sh
timeout 120 python3 benchmarks/profile_prefill.py 1 2048 --plugins > "$OUT/profile_prefill_2048.txt" 2>&1; grep -A16 "==== glm_engine" "$OUT/profile_prefill_2048.txt" | cut -c1-60,160-230
build_all_plugins_engine "$WORK/fp16" | grep -v "^===" | tail -2
P=(--batch_size 1 --input_len 2048 --output_len 2 --repeats 7)
python3 benchmark.py --engine_dir "$WORK/fp16" "${P[@]}" --output_json "$OUT/prefill2048_A.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/2048 A /"
(cd /tmp/base_ccd4838 && python3 benchmark.py --engine_dir "$WORK/fp16" "${P[@]}" --output_json /tmp/p_B.json 2>&1 | grep "glm_engine\|rror" | sed "s/^/2048 B /")
rm -rf "$WORK/fp16"
B=(--batch_size 1 2 8 --input_len 1024 --output_len 64)
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 | grep -v "^===" | tail -2
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json "$OUT/int4_A$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/int4 A$round /"
  (cd /tmp/base_ccd4838 && python3 benchmark.py --engine_dir "$WORK/int4" "${B[@]}" --output_json /tmp/int4_B$round.json 2>&1 | grep "glm_engine\|rror" | sed "s/^/int4 B$round /")
done
python3 benchmark.py --engine_dir "$WORK/int4" --batch_size 1 8 --input_len 1024 --output_len 64 --hf --output_json "$OUT/int4_hf.json" 2>&1 | grep "glm_engine\|hf_\|rror" | sed "s/^/int4 hf-run /"
