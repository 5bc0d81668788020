# Sourced by the scripts/gpu_*.sh runs on the lent GPU: installs carried wheels
# (.whl/), sets OUT (results) and WORK (engines), records the card and versions,
# and defines `step`, which runs a command, logs it to $OUT/log.txt and prints
# its exit status.
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; WORK=/tmp/glm_work; mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"; echo "=== exit ${PIPESTATUS[0]}: $1 $2"; }
# The in-flight batching engine of docs/PERFORMANCE.md (dummy 6B, fp16, 256 in flight) at $1.
build_inflight_engine() {
  step python3 build.py --output_dir "$1" --dtype float16 --max_batch_size 256 --max_input_len 1024 \
    --max_output_len 512 --random_seed 0 --log_level warning --use_inflight_batching --use_layernorm_plugin float16 \
    --use_gemm_plugin float16
}
