#!/usr/bin/env bash
# Creates .venv (if missing) and installs requirements.txt into it.
# A torch already in .venv is kept: requirements.txt gives lower bounds only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements.txt
