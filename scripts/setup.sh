#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it, saying what it installs.
# torch: one already in .venv is kept; otherwise the build that fits this machine: the
# default (CUDA) build where an NVIDIA driver is present, else the CPU build from
# PyTorch's CPU wheel index (a few hundred MB instead of several GB of CUDA
# libraries). TORCH_SPEC="torch==X.Y.Z" (any pip requirement) chooses it yourself.
# Then requirements.txt (lower bounds, not pins) and the glm_engine package itself
# (pip install -e ., so that it imports from any directory).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check)
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: keeping the torch in .venv: $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_SPEC:-}" ]; then
  echo "setup: installing $TORCH_SPEC (TORCH_SPEC)"
  "${PIP[@]}" "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
  echo "setup: NVIDIA driver found: installing torch's default build (CUDA; several GB, a few minutes)"
  "${PIP[@]}" "torch>=2.4"
else
  # The newest CPU build (version +cpu) that PyTorch's CPU index or a local mirror offers.
  CPU_INDEX=https://download.pytorch.org/whl/cpu
  cpu_version=$(.venv/bin/python -m pip index versions torch --extra-index-url "$CPU_INDEX" --retries 0 \
                  --timeout 10 2>/dev/null | .venv/bin/python -c '
import re, sys
found = re.search(r"Available versions: (.*)", sys.stdin.read())
versions = [v.strip() for v in found.group(1).split(",")] if found else []
print(next((v for v in versions if v.endswith("+cpu") and tuple(map(int, v.split(".")[:2])) >= (2, 4)), ""))')
  if [ -n "$cpu_version" ]; then
    echo "setup: no NVIDIA driver: installing torch $cpu_version, the CPU build (a few hundred MB)"
    "${PIP[@]}" --no-deps "torch==$cpu_version" --extra-index-url "$CPU_INDEX"
  else
    echo "setup: no NVIDIA driver, but no CPU build of torch is reachable ($CPU_INDEX): installing pip's"
    echo "       default torch, which may be a CUDA build of several GB; set TORCH_SPEC to choose"
    "${PIP[@]}" "torch>=2.4"
  fi
fi
echo "setup: installing requirements.txt (transformers, triton, safetensors, sentencepiece, ...)"
"${PIP[@]}" -r requirements.txt
echo "setup: installing glm_engine (pip install -e .)"
"${PIP[@]}" --quiet --no-deps --no-build-isolation -e .
echo "setup: .venv ready: torch $(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA " + torch.version.cuda if torch.version.cuda else "CPU build")')"
