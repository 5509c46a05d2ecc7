#!/usr/bin/env bash
# Create .venv and install drift-engine with its test dependencies.
# torch is pinned first so that pip takes the local CPU build instead of a CUDA one;
# on a GPU machine install torch for your CUDA first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
