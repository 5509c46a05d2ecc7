"""Same-run comparison of the torch backend's ce_forward before and after the CPU changes,
and the variants that separate the chunk size from the row pass (plain tensors, no
autograd, weighted mean coefficients, SmolLM2-135M head, 2 threads, round-robin rounds):

    git show cdbe7e3:drift_engine/ops/torch_impl.py > /tmp/old_torch_impl.py
    python bench/results/cpu-2026-12-02/backend_before_after.py /tmp/old_torch_impl.py 5 out.json
"""
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
torch.set_num_threads(2)
from drift_engine.ops import torch_impl as new
from drift_engine.ops.options import CrossEntropyOptions

spec = importlib.util.spec_from_file_location("old_impl", sys.argv[1])
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
import loss_kernel as lk

inp = lk.make_inputs(lk.PRESETS["cpu-smollm2-135m"], torch.device("cpu"))
h, w, y, tw = inp.hidden.detach(), inp.weight.detach(), inp.labels, inp.token_weights
coef = tw / tw.sum()
opts = CrossEntropyOptions()
def o(c): return dataclasses.replace(opts, chunk_size=c)
variants = {
    "floor": lambda: ((lambda l: (l @ w, l.T @ h))(h @ w.T)),
    "old (85-row chunks)": lambda: old.ce_forward(h, w, None, y, opts, coef),
    "old row pass, 1024-row chunks": lambda: old.ce_forward(h, w, None, y, o(1024), coef),
    "new (2 x 1024 rows)": lambda: new.ce_forward(h, w, None, y, opts, coef),
    "new row pass, 85-row chunks": lambda: new.ce_forward(h, w, None, y, o(85), coef),
    "new, one chunk of 2048": lambda: new.ce_forward(h, w, None, y, o(2048), coef),
}
names = list(variants)
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
for n in names: variants[n]()
samples = {n: [] for n in names}
for r in range(reps):
    for n in names:
        a, b = time.perf_counter(), time.process_time()
        variants[n]()
        samples[n].append((time.perf_counter() - a, time.process_time() - b))
res = {}
for n in names:
    cr = [c / f for (_, c), (_, f) in zip(samples[n], samples["floor"])]
    wr = [wl / f for (wl, _), (f, _) in zip(samples[n], samples["floor"])]
    res[n] = dict(cpu_s=statistics.median(c for _, c in samples[n]), wall_s=statistics.median(x for x, _ in samples[n]),
                  cpu_vs_floor=statistics.median(cr), cpu_vs_floor_range=[min(cr), max(cr)], wall_vs_floor=statistics.median(wr))
    print(f"| {n} | {res[n]['cpu_s']:.2f} | {res[n]['cpu_vs_floor']:.2f} ({min(cr):.2f}–{max(cr):.2f}) | {res[n]['wall_s']:.2f} | {res[n]['wall_vs_floor']:.2f} |", flush=True)
if len(sys.argv) > 3: json.dump(dict(reps=reps, threads=torch.get_num_threads(), torch=torch.__version__, rows=res), open(sys.argv[3], "w"), indent=2)
