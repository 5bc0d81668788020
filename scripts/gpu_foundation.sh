#!/usr/bin/env bash
# On the lent GPU: builds a dummy ChatGLM2-6B fp16 engine, runs it, measures it
# against GlmForCausalLM (eager) on the same weights, and summarizes the bundled
# sample with both. Results land in $OUT. Run from the repository root.
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; WORK=/tmp/glm_work; mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 scripts/make_demo_tokenizer.py "$WORK/tok"
step() { echo "=== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; echo "=== exit ${PIPESTATUS[0]}: $1 $2"; }
step python3 build.py --output_dir "$WORK/eng6b" --dtype float16 --tokenizer_dir "$WORK/tok" \
  --max_batch_size 8 --max_input_len 1024 --max_output_len 1024 --random_seed 0
step python3 run.py --engine_dir "$WORK/eng6b" --max_output_len 32
step python3 benchmark.py --engine_dir "$WORK/eng6b" --batch_size 1 8 --input_len 1024 --output_len 64 --hf \
  --accuracy --output_json "$OUT/foundation_dummy6b_fp16.json"
step python3 summarize.py --engine_dir "$WORK/eng6b" --dataset_path data/cnn_dailymail_sample.jsonl --test_hf \
  --batch_size 4 --max_ite 2 --output_len 32 --max_input_len 800 --log_level warning
