#!/usr/bin/env bash
# Sets up .venv and runs the test suite (CPU only; tiny checkpoints made on the fly).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
