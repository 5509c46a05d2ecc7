#!/usr/bin/env bash
# GPU check in one call, cut at GPU_CHECK_BUDGET_S (default 540 s, under the device's
# 10-minute limit per call; the whole list takes about 10 minutes on one H100, so the last
# steps may be skipped):
#   1. install the package (editable, offline) and, when present and not importable, the
#      liger-kernel and cut-cross-entropy wheels from .whl/ (see bench/README.md for
#      fetching them; the call carries .whl);
#   2. the GPU tests (`pytest -m gpu`: compiled layers vs eager in bf16 on CUDA among them),
#      the kernel and op tests on CUDA, and the compile tests (CPU) against this image's
#      torch and transformers;
#   3. training throughput (Qwen2-0.5B config): eager against the reference and against
#      Hugging Face packed + Liger's fused loss, then with compiled decoder layers, then a
#      profile of the compiled step by category;
#   4. the loss benchmark at both presets, cross-entropy and log-probs, and the second
#      preset's token-chunk and log-prob rows with one chunk of all rows;
#   5. a profile of the eager step;
#   6. training throughput with trajectories up to 3072 tokens (the reference's padded
#      fp32 logits may run out of memory: then only the trainer is reported);
#   7. rollout throughput, the HF engine (and vLLM when the image has it).
# Most important first: a session short of time still gets the earlier steps.
# Everything (logs, JSON, markdown) goes to $OUT, default bench/results/gpu-<UTC date>.
# A failing step is logged and the next one still runs; the exit status is the number of
# failed (or skipped) steps.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
START_S=$SECONDS

# step NAME TIMEOUT_S LOGFILE CMD...: run CMD with a time limit, output to LOGFILE. The
# limit is cut to what is left of the whole script's budget; with under 20 s left the step
# is skipped (and counted as failed).
step() {
    local name="$1" limit="$2" logfile="$3"
    shift 3
    local left=$((BUDGET_S - (SECONDS - START_S)))
    if [ "$left" -lt 20 ]; then
        log "skip  $name: ${left}s left of the ${BUDGET_S}s budget"
        FAILED=$((FAILED + 1))
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
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
# The source tree imports as the package too (the kernels live in drift_engine/kernels), so
# the steps run even where the image's setuptools is too old for the editable install.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Each pure-Python peer from its wheel, offline, only where the image cannot import it.
wheels=()
for peer in liger_kernel cut_cross_entropy; do
    timeout 60 python -c "import $peer" 2>/dev/null && continue
    shopt -s nullglob
    found=(.whl/"$peer"-*.whl)
    shopt -u nullglob
    if [ "${#found[@]}" -gt 0 ]; then
        wheels+=("${found[0]}")
    else
        log "$peer is not importable and no .whl/$peer-*.whl was carried: its rows say so"
    fi
done
if [ "${#wheels[@]}" -gt 0 ]; then
    step wheels 30 "$OUT/wheels.log" python -m pip install --no-deps --no-index "${wheels[@]}"
fi
{
    timeout 30 nvidia-smi
    timeout 60 python - <<'PY'
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
# Every GPU-marked test, then the kernel and op tests (on CUDA when it is present) and the
# compile tests (CPU, but against this image's torch and transformers).
step pytest-gpu 150 "$OUT/pytest-gpu.log" python -m pytest -q -m gpu tests
op_tests=(tests/test_kernels.py)
for f in tests/test_ops*.py tests/test_train_compile.py; do [ -e "$f" ] && op_tests+=("$f"); done
step pytest-kernels 150 "$OUT/pytest-kernels.log" python -m pytest -q "${op_tests[@]}"

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    grep -E '^(torch|triton|transformers|liger_kernel|cut_cross_entropy) ' "$OUT/environment.txt"
    echo '```'
    echo
} >"$SUMMARY"

# throughput NAME LIMIT EXTRA_ARGS...: the GPU preset (Qwen2-0.5B config, random init) on
# 256 trajectories.
throughput() {
    local name="$1" limit="$2"
    shift 2
    step "$name" "$limit" "$OUT/$name.log" \
        python bench/train_throughput.py --preset gpu --trajectories 256 \
        --json "$OUT/$name.json" "$@"
    { echo "## $name $*"; echo '```'; tail -n 12 "$OUT/$name.log" 2>/dev/null; echo '```'; } >>"$SUMMARY"
}

# profile VARIANT LIMIT EXTRA_ARGS...: where the trainer's step time goes.
profile() {
    local variant="$1" limit="$2"
    shift 2
    step "profile-$variant" "$limit" "$OUT/profile-$variant.md" \
        python bench/profile_train.py --preset gpu --trajectories 160 "$@" \
        --json "$OUT/profile-$variant.json"
    { tail -n 45 "$OUT/profile-$variant.md" 2>/dev/null; echo; } >>"$SUMMARY"
}

# ---------------------------------------------------------------- 3. training throughput
# Both trainers, eager; then this trainer alone with compiled decoder layers (the untimed
# warmup includes the compile), and its step profile while the compiled code is cached
# (more warmup steps: the recompile at the first new longest-sequence length comes before
# the profiled steps).
throughput train-throughput 200
throughput train-throughput-compiled 300 --compile --no-reference --no-hf-packed
profile compiled 180 --compile --warmup 4

# ---------------------------------------------------------------- 4. loss benchmark
for preset in llama3-8b qwen2.5-3b; do
    step "loss-$preset" 150 "$OUT/loss-$preset.md" \
        python bench/loss_kernel.py --preset "$preset" --op all --json "$OUT/loss-$preset.json"
    cat "$OUT/loss-$preset.md" 2>/dev/null >>"$SUMMARY"
    echo >>"$SUMMARY"
done

# One chunk of all 16384 rows at the second preset (logits 5.0 GB instead of three chunks
# of 1.7 GB): grad of weight becomes one GEMM written once, without the fp32 accumulator
# that three chunks read and write (1.2 GB each time).
step loss-qwen2.5-3b-one-chunk 120 "$OUT/loss-qwen2.5-3b-one-chunk.md" \
    python bench/loss_kernel.py --preset qwen2.5-3b --op all --impl drift-triton,floor \
    --chunk-size 16384 --json "$OUT/loss-qwen2.5-3b-one-chunk.json"
cat "$OUT/loss-qwen2.5-3b-one-chunk.md" 2>/dev/null >>"$SUMMARY"

# ---------------------------------------------------------------- 5. eager step profile
profile eager 120

# ---------------------------------------------------------------- 6. longer trajectories
throughput train-throughput-3072 150 --max-tokens 3072 --no-hf-packed

# ---------------------------------------------------------------- 7. rollout throughput
engines=hf
timeout 60 python -c "import vllm" 2>/dev/null && engines=vllm,hf
step rollout-throughput 150 "$OUT/rollout-throughput.log" \
    python bench/rollout_throughput.py --preset gpu --engines "$engines" \
    --json "$OUT/rollout-throughput.json"
{ echo "## rollout throughput ($engines)"; echo '```'; tail -n 12 "$OUT/rollout-throughput.log" 2>/dev/null; echo '```'; } >>"$SUMMARY"

{ echo "## steps"; echo '```'; cat "$OUT/steps.log"; echo '```'; } >>"$SUMMARY"
log "done: $FAILED failed step(s); results in $OUT"
exit "$FAILED"
