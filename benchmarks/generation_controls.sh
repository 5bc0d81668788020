#!/usr/bin/env bash
# On the lent GPU: issue 12's rows. First what one 256-row step's token choice costs
# per part (benchmarks/sampling_gpu.py). Then docs/PERFORMANCE.md's 512-request workload
# (inputs 400-800, 100 out, all at once) on the in-flight engine: a warm-up run, then
# greedy and sampled (temperature 0.8, top-p 0.9, repetition penalty 1.1) alternating,
# twice: sampled should be within 10% of greedy's output tokens/s. Then summarize.py with
# 4 beams on the bundled sample, engine against HF (latency, token agreement).
set -uo pipefail
source "$(dirname "$0")/common.sh"
PYTHONPATH=. python3 benchmarks/sampling_gpu.py 2>&1 | tee "$OUT/sampling_parts.txt"
build_inflight_engine "$WORK/ifb"
S=(--mode throughput --num_requests 512 --input_len_range 400 800 --output_len 100)
step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --output_json "$OUT/warm.json" > /dev/null
for i in 1 2; do
  step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --output_json "$OUT/greedy$i.json"
  step python3 benchmark.py --engine_dir "$WORK/ifb" "${S[@]}" --top_k 0 --temperature 0.8 --top_p 0.9 \
    --repetition_penalty 1.1 --output_json "$OUT/sampled$i.json"
done
rm -rf "$WORK/ifb"
build_all_plugins_engine "$WORK/all"
step python3 summarize.py --engine_dir "$WORK/all" --dataset_path data/cnn_dailymail_sample.jsonl --test_hf \
  --num_beams 4 --batch_size 1 --max_ite 8 --output_len 64 --data_type fp16
