#!/usr/bin/env bash
# On the lent GPU: builds a dummy ChatGLM2-6B fp16 engine, runs it, measures it
# against GlmForCausalLM (eager) on the same weights, and summarizes the bundled
# sample with both. Results land in $OUT. Run from the repository root.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
python3 scripts/make_demo_tokenizer.py "$WORK/tok"
step python3 build.py --output_dir "$WORK/eng6b" --dtype float16 --tokenizer_dir "$WORK/tok" \
  --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0
step python3 run.py --engine_dir "$WORK/eng6b" --max_output_len 32
step python3 benchmark.py --engine_dir "$WORK/eng6b" --batch_size 1 8 --input_len 1024 --output_len 64 --hf \
  --accuracy --output_json "$OUT/foundation_dummy6b_fp16.json"
step python3 summarize.py --engine_dir "$WORK/eng6b" --dataset_path data/cnn_dailymail_sample.jsonl --test_hf \
  --batch_size 4 --max_ite 2 --output_len 32 --max_input_len 800 --log_level warning
