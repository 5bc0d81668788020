#!/bin/bash
# Session 7 call 3: context FMHA sweep against SDPA; prefill of 2048 tokens end to end with the Hugging Face
# baseline in the same run; the prefill profile.
set -uo pipefail
source benchmarks/common.sh
step timeout 280 python3 docs/benchmarks/prefill_s7/call3/fmha_sweep.py "$OUT/fmha_sweep.json"
build_all_plugins_engine "$WORK/fp16" | grep -v "^===" | tail -2
step timeout 150 python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 --input_len 2048 --output_len 8 --hf --output_json "$OUT/prefill2048_hf.json" 2>&1 | grep -v "^===" | tail -8
step timeout 120 python3 benchmarks/profile_prefill.py 1 2048 --plugins > "$OUT/profile_prefill_2048.txt" 2>&1; tail -30 "$OUT/profile_prefill_2048.txt"
