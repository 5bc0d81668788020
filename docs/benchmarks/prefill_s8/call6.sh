#!/usr/bin/env bash
# session 8 call 6: fp16 A+L+G+F32 decode profile at batch 1 (1024 in), with the HF baseline; this tree.
set -uo pipefail
source benchmarks/common.sh
build_all_plugins_engine "$WORK/fp16"
step timeout 150 python3 benchmark.py --engine_dir $WORK/fp16 --batch_size 1 8 --input_len 1024 --output_len 64 --hf --output_json $OUT/fp16.json
step timeout 120 python3 benchmarks/profile_decode.py $WORK/fp16 --json $OUT/profile_fp16.json
grep -h "^===\|^glm_engine\|^hf_\|start-up\|decode step\|launch gaps\|^[a-z_].*\[.*\]" $OUT/log.txt | cut -c1-200
