"""Fused loss before and after the per-call overhead change, in one run, rows round-robin.

    git archive <before> drift_engine | tar -x -C /tmp/old
    mv /tmp/old/drift_engine /tmp/old/drift_engine_old
    grep -rl drift_engine /tmp/old/drift_engine_old | xargs sed -i 's/drift_engine/drift_engine_old/g'
    PYTHONPATH=.:/tmp/old python bench/results/cpu-2026-12-02/overhead_before_after.py \
        PRESET REPS THREADS [out.json]

Rows: the three GEMMs (floor), PyTorch's dense loss, ``fused_linear_cross_entropy(...,
impl="torch", check_labels=False)`` before (the renamed copy) and after; forward+backward
of the weighted mean, as bench/loss_kernel.py times it (its cases and its round-robin
timer, CPU time ratios to the floor as medians of per-round ratios).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import loss_kernel as lk  # noqa: E402
from drift_engine_old.ops import fused_linear_cross_entropy as before  # noqa: E402

from drift_engine.ops import fused_linear_cross_entropy as after  # noqa: E402

preset_name, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
preset = lk.PRESETS[preset_name]
torch.set_num_threads(threads)
inputs = lk.make_inputs(preset, torch.device("cpu"))
h, w, labels, tw = inputs.hidden, inputs.weight, inputs.labels, inputs.token_weights


def fused(fn):
    return lambda: fn(h, w, labels, token_weights=tw, impl="torch", check_labels=False)


cases = [
    lk._floor_case(inputs),
    lk._autograd_case("dense", inputs, "ce", lambda: lk._dense(h, w, inputs, "ce", torch.float32)),
    lk._autograd_case("before", inputs, "ce", fused(before)),
    lk._autograd_case("after", inputs, "ce", fused(after)),
]
rows = lk.cpu_timings(cases, inputs, reps)
result = {"preset": preset_name, "reps": reps, "threads": torch.get_num_threads(),
          "torch": torch.__version__, "rows": {}}
for case, row in zip(cases, rows, strict=True):
    result["rows"][case.name] = {k: v for k, v in row.items()}
    print(f"{case.name:20s} fwd+bwd CPU ms {row['fwd_bwd_cpu_ms'][0]:9.3f}  x floor (CPU) "
          f"{row['fwd_bwd_cpu_vs_floor'][0]:.3f}  wall ms {row['fwd_bwd_ms'][0]:9.3f}")
dense = result["rows"]["dense"]["fwd_bwd_cpu_vs_floor"][0]
for name in ("before", "after"):
    ratio = result["rows"][name]["fwd_bwd_cpu_vs_floor"][0] / dense
    print(f"{name} / dense (CPU time, of the medians x floor): {ratio:.3f}")
if len(sys.argv) > 4:
    Path(sys.argv[4]).write_text(json.dumps(result, indent=2) + "\n")
