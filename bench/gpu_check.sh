#!/usr/bin/env bash
# GPU check in one call (at most about 9 minutes of step limits; typically 4-5 on one H100):
#   1. install the package (editable, offline) and, when present, the liger-kernel and
#      cut-cross-entropy wheels from .whl/ (see bench/README.md for fetching them);
#   2. the GPU tests (`pytest -m gpu`) and the kernel/op tests, now on CUDA;
#   3. the loss benchmark at both presets, cross-entropy and log-probs;
#   4. the training-throughput benchmark, when bench/train_throughput.py exists.
# Everything (logs, JSON, markdown) goes to $OUT, default bench/results/gpu-<UTC date>.
# A failing step is logged and the next one still runs; the exit status is the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

# step NAME TIMEOUT_S LOGFILE CMD...: run CMD with a time limit, output to LOGFILE.
step() {
    local name="$1" limit="$2" logfile="$3"
    shift 3
    log "start $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$logfile" 2>&1
    local rc=$?
    log "end   $name: exit $rc after $((SECONDS - start))s (log: $logfile)"
    if [ "$rc" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        tail -n 20 "$logfile" | sed 's/^/    /' | tee -a "$OUT/steps.log"
    fi
    return 0
}

# ---------------------------------------------------------------- 1. setup
step install 60 "$OUT/setup.log" python -m pip install --no-deps --no-build-isolation -e .
# The source tree imports as the package too (drift_engine/kernels links to kernels/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=(.whl/liger_kernel*.whl .whl/cut_cross_entropy*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    step wheels 30 "$OUT/wheels.log" python -m pip install --no-deps --no-index "${wheels[@]}"
else
    log "no liger-kernel / cut-cross-entropy wheels in .whl/: those rows will be skipped"
fi
{
    nvidia-smi
    python - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError:
        print(name, "not installed")
PY
} >"$OUT/environment.txt" 2>&1

# ---------------------------------------------------------------- 2. tests
# Every GPU-marked test, then the kernel and op tests (they run on CUDA when it is present).
step pytest-gpu 90 "$OUT/pytest-gpu.log" python -m pytest -q -m gpu tests
op_tests=(tests/test_kernels.py)
for f in tests/test_ops*.py; do [ -e "$f" ] && op_tests+=("$f"); done
step pytest-kernels 90 "$OUT/pytest-kernels.log" python -m pytest -q "${op_tests[@]}"

# ---------------------------------------------------------------- 3. loss benchmark
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    grep -E '^(torch|triton|transformers|liger_kernel|cut_cross_entropy) ' "$OUT/environment.txt"
    echo '```'
    echo
} >"$SUMMARY"
for preset in llama3-8b qwen2.5-3b; do
    step "loss-$preset" 150 "$OUT/loss-$preset.md" \
        python bench/loss_kernel.py --preset "$preset" --op all --json "$OUT/loss-$preset.json"
    cat "$OUT/loss-$preset.md" >>"$SUMMARY"
    echo >>"$SUMMARY"
done

# ---------------------------------------------------------------- 4. training throughput
# ==== training-throughput benchmark (bench/train_throughput.py, maintained separately) ====
# The GPU preset (Qwen2-0.5B config, random init) on 256 trajectories, both trainers.
if [ -f bench/train_throughput.py ]; then
    step train-throughput 150 "$OUT/train-throughput.log" \
        python bench/train_throughput.py --preset gpu --trajectories 256 \
        --json "$OUT/train-throughput.json"
    { echo "## training throughput"; echo '```'; tail -n 30 "$OUT/train-throughput.log"; echo '```'; } >>"$SUMMARY"
else
    log "bench/train_throughput.py not present: training throughput skipped"
fi
# ==== end of training-throughput benchmark ====

{ echo "## steps"; echo '```'; cat "$OUT/steps.log"; echo '```'; } >>"$SUMMARY"
log "done: $FAILED failed step(s); results in $OUT"
exit "$FAILED"
