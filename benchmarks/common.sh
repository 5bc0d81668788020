# Sourced by the benchmarks/*.sh runs on the lent GPU: installs carried wheels
# (.whl/), sets OUT (results) and WORK (engines, in memory), records the card and
# versions, and defines `step` (runs a command, logs it to $OUT/log.txt, prints its
# exit status) and the engines of docs/PERFORMANCE.md.
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; WORK=/dev/shm/glm; mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]\|B/s\]" | tee -a "$OUT/log.txt"; echo "=== exit ${PIPESTATUS[0]}: $1 $2"; }
# Dummy ChatGLM2-6B fp16 engines: build_engine DIR [more build.py flags].
SIX_B=(--dtype float16 --max_batch_size 8 --max_input_len 2048 --max_output_len 512 --random_seed 0 --log_level warning)
PLUGINS=(--use_gpt_attention_plugin float16 --use_layernorm_plugin float16)
build_engine() { local dir=$1; shift; step python3 build.py --output_dir "$dir" "${SIX_B[@]}" "$@"; }
# The all-plugins engine (A+L+G+F32) of the decode tables.
build_all_plugins_engine() { build_engine "$1" "${PLUGINS[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc; }
# The in-flight batching engine of the serving tables (256 in flight).
build_inflight_engine() {  # DIR [more build.py flags]
  local dir=$1; shift
  step python3 build.py --output_dir "$dir" --dtype float16 --max_batch_size 256 --max_input_len 1024 \
    --max_output_len 512 --random_seed 0 --log_level warning --use_inflight_batching --use_layernorm_plugin float16 \
    --use_gemm_plugin float16 "$@"
}
# /tmp/variant: this tree with glm_engine/ replaced by VARIANT_DIR (A/B runs against a variant).
make_variant() {
  rm -rf /tmp/variant && mkdir -p /tmp/variant && cp -r . /tmp/variant/ && rm -rf /tmp/variant/glm_engine \
    && cp -r "$1" /tmp/variant/glm_engine
}
