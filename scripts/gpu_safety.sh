#!/usr/bin/env bash
# On the lent GPU, after the safety work (engine format 2: config/tokenizer checksums and
# tensor specs checked at load; engines replaced under a lock): the kernel tests on real
# hardware, then the all-plugins fp16 engine (dummy ChatGLM2-6B) built twice (the second
# build replaces the first), run, and benchmarked at batch 1 and 8 with HF eager as the
# baseline of the same run, and an int8 engine at batch 1. Results in $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
part=${1:-all}
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0
        --log_level warning --use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
B=(--input_len 1024 --output_len 64)
if [ "$part" = all ] || [ "$part" = plugins ]; then
  step python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
  step python3 build.py --output_dir "$WORK/all" "${COMMON[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc
  step python3 build.py --output_dir "$WORK/all" "${COMMON[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc
  ls -a "$WORK" | tee -a "$OUT/log.txt"
  printf '64790,64792,36474,54591\n' > "$WORK/p.csv"
  step python3 run.py --engine_dir "$WORK/all" --input_tokens "$WORK/p.csv" --max_output_len 16 --output_csv /dev/null
  ls -l /dev/null | tee -a "$OUT/log.txt"
  step python3 benchmark.py --engine_dir "$WORK/all" --batch_size 1 8 "${B[@]}" --hf --output_json "$OUT/all.json"
fi
if [ "$part" = all ] || [ "$part" = int8 ]; then
  step python3 build.py --output_dir "$WORK/int8" "${COMMON[@]}" --use_weight_only --weight_only_precision int8
  step python3 benchmark.py --engine_dir "$WORK/int8" --batch_size 1 "${B[@]}" --hf --output_json "$OUT/int8.json"
fi
