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
