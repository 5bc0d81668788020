#!/usr/bin/env bash
# On the lent GPU: the kernel tests on real hardware (bfloat16 included), then an
# int8 weight-only engine and an all-plugins fp16 engine benchmarked with HF
# eager as the baseline of the same run. Results in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; WORK=/tmp/glm_work; mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"; echo "=== exit ${PIPESTATUS[0]}"; }
step python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
COMMON=(--dtype float16 --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0 --log_level warning
        --use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
step python3 build.py --output_dir "$WORK/int8" "${COMMON[@]}" --use_weight_only --weight_only_precision int8
step python3 benchmark.py --engine_dir "$WORK/int8" "${B[@]}" --hf --output_json "$OUT/final_int8.json"
