#!/usr/bin/env bash
# On the lent GPU: issue 12's rows (not run yet). docs/PERFORMANCE.md's 512-request
# workload (inputs 400-800, 100 out, all at once) on the in-flight engine, greedy and
# then sampled (temperature 0.8, top-p 0.9, repetition penalty 1.1), in one call: the
# sampled run should be within 10% of greedy's output tokens/s. Then summarize.py with
# 4 beams on the bundled sample, engine against HF (latency, token agreement).
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_inflight_engine "$WORK/ifb"
S=(--mode throughput --num_requests 512 --input_len_range 400 800 --output_len 100)
step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --output_json "$OUT/greedy.json"
step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --top_k 0 --temperature 0.8 --top_p 0.9 \
  --repetition_penalty 1.1 --output_json "$OUT/sampled.json"
step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --output_json "$OUT/greedy_again.json"
rm -rf "$WORK/ifb"
build_all_plugins_engine "$WORK/all"
step python3 summarize.py --engine_dir "$WORK/all" --dataset_path data/cnn_dailymail_sample.jsonl --test_hf \
  --num_beams 4 --batch_size 1 --max_ite 8 --output_len 64 --data_type fp16
