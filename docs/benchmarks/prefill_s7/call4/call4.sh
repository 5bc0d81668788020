#!/bin/bash
# Session 7 call 4: prefill: rotary kernel (several tokens a program) and SDPA for fresh prompts. Micro, GPU tests,
# fp16 all-plugins engine A (tree) / B (ccd4838) A B A B at 2048 and 1024 in, Hugging Face baseline.
set -uo pipefail
source benchmarks/common.sh
step timeout 150 python3 docs/benchmarks/prefill_s7/call4/prefill_micro.py /tmp/base_ccd4838 "$OUT/prefill_micro.json"
step timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py 2>&1 | tail -3
build_all_plugins_engine "$WORK/fp16" | grep -v "^===" | tail -2
for round in 1 2; do
  for len in 2048 1024; do
    bs="1"; [ $len = 1024 ] && bs="1 8"
    python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size $bs --input_len $len --output_len 16 --output_json "$OUT/fp16_${len}_A$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/$len A$round /"
    (cd /tmp/base_ccd4838 && python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size $bs --input_len $len --output_len 16 --output_json "/tmp/fp16_${len}_B$round.json" 2>&1 | grep "glm_engine\|rror" | sed "s/^/$len B$round /")
  done
done
python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 --input_len 256 --output_len 8 --repeats 1 --accuracy --output_json /tmp/acc.json 2>&1 | grep -i "relative\|rror"
python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 --input_len 2048 --output_len 16 --hf --output_json "$OUT/prefill2048_hf.json" 2>&1 | grep "glm_engine\|hf_\|rror\|start"
