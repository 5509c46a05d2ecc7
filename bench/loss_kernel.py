"""Microbenchmark of the fused linear losses against PyTorch, Liger-Kernel, Cut Cross-Entropy
and the GEMM floor.

    python bench/loss_kernel.py --preset llama3-8b|qwen2.5-3b|cpu-small|cpu-smollm2-135m|cpu-demo \
        [--impl drift-triton,drift-torch,drift-torch-python,torch,liger,cce,cce-exact,floor] \
        [--op ce|logprobs|all] [--chunk-size C] [--reps R] [--threads T] [--json out.json]

Workloads (one preset = N tokens, hidden size H, vocabulary V, dtype):
  ce        importance-weighted scalar loss Σ w·ce / Σ w, random token weights w
            (log-normal), ~10% ignored labels; backward from the scalar.
  logprobs  per-token log π(label) with a random per-token upstream gradient (PPO-style);
            backward recomputes the logits.

Per implementation: median and 20/80 % quantiles of forward and forward+backward
(triton.testing.do_bench on CUDA, a perf_counter loop on CPU), peak memory above the inputs
(includes the gradient buffers; CUDA: the allocator's peak, CPU: the process's peak resident
set, Linux only), relative error of the loss / log-probs and of the gradients (max over
hidden and weight of ‖g - g_ref‖_F / ‖g_ref‖_F) against a dense reference (fp32 on CUDA,
float64 on CPU), and TFLOP/s counted as 2·N·H·V (forward) and 6·N·H·V (forward+backward; the
logits recompute of log-probs backward is not counted as useful work).

On CPU the rows are timed round-robin (one call of each row per round, ``--reps`` rounds),
so that on a shared machine every row sees the same load, and the ratio to the floor is the
median of the per-round ratios; the process's CPU time (all threads) is reported next to the
wall time, being far less sensitive to other processes. CPU presets run on ``--threads``
threads (default: the preset's).

"drift-torch" is the PyTorch backend as installed: on CPU with the native cross-entropy when
it is built (``drift-engine native build``); "drift-torch-python" the same with the native
code off.

"floor" is cuBLAS alone: one GEMM (forward) and the three GEMMs logits, grad of hidden,
grad of weight (forward+backward), in the input dtype.

``--chunk-size`` sets ``chunk_size`` (rows of logits held at once; the default sizes chunks
from a 2 GiB budget) of the drift token-chunk and log-prob rows, e.g. one chunk of all N
rows, so grad of weight is one GEMM written once instead of an fp32 accumulator over chunks.
The memory-lean row keeps its own sizing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Preset:
    num_tokens: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    threads: int | None = None  # CPU threads (None: torch's default)


PRESETS = {
    "llama3-8b": Preset(8192, 4096, 128256, torch.bfloat16),
    "qwen2.5-3b": Preset(16384, 2048, 151936, torch.bfloat16),
    "cpu-small": Preset(48, 32, 257, torch.float32),
    # SmolLM2-135M's LM head (hidden 576, vocabulary 49152) on a 2048-token batch.
    "cpu-smollm2-135m": Preset(2048, 576, 49152, torch.float32, threads=2),
    # The demo's toy model (hidden 64, 120-token vocabulary) on its 512-token micro-batches.
    "cpu-demo": Preset(512, 64, 120, torch.float32, threads=2),
}

ALL_IMPLS = [
    "drift-triton", "drift-torch", "drift-torch-python", "torch", "liger", "cce", "cce-exact", "floor"
]  # fmt: skip
# The default --impl: all but drift-torch-python, which differs from drift-torch only on CPU
# with the native code built (a second run of the torch backend on a GPU preset costs minutes).
DEFAULT_IMPLS = [impl for impl in ALL_IMPLS if impl != "drift-torch-python"]
# Implementations that have a log-probs workload (the others compute a loss only).
LOGPROB_IMPLS = {"drift-triton", "drift-torch", "drift-torch-python", "torch", "floor"}


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # (N, H) leaf, requires grad
    weight: torch.Tensor  # (V, H) leaf, requires grad
    labels: torch.Tensor  # (N,) int64, ~10% IGNORE_INDEX
    token_weights: torch.Tensor  # (N,) fp32, 0 on ignored rows
    upstream: torch.Tensor  # (N,) fp32 upstream gradient of per-token log-probs


@dataclasses.dataclass
class Case:
    """One row of the table: how to run forward, and forward+backward."""

    name: str
    forward: Callable[[], object]
    forward_backward: Callable[[], object]  # leaves gradients in .grad (or returns them)
    output: Callable[[], tuple]  # (value, grad_hidden, grad_weight) for the error columns


def make_inputs(preset: Preset, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, h, v = preset.num_tokens, preset.hidden_size, preset.vocab_size
    # Logits of standard deviation ~2: a realistic softmax spread.
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.1] = IGNORE_INDEX
    token_weights = torch.exp(0.5 * torch.randn(n, generator=gen))
    token_weights[labels == IGNORE_INDEX] = 0.0
    upstream = torch.randn(n, generator=gen)
    return Inputs(
        hidden=hidden.to(device=device, dtype=preset.dtype).requires_grad_(),
        weight=weight.to(device=device, dtype=preset.dtype).requires_grad_(),
        labels=labels.to(device),
        token_weights=token_weights.to(device),
        upstream=upstream.to(device),
    )


# ----------------------------------------------------------------------------- references


def reference(
    inputs: Inputs, op: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (value, grad_hidden, grad_weight) of the workload, computed in ``dtype``."""
    hidden = inputs.hidden.detach().to(dtype).requires_grad_()
    weight = inputs.weight.detach().to(dtype).requires_grad_()
    value = _dense(hidden, weight, inputs, op, logits_dtype=dtype)
    grad_h, grad_w = torch.autograd.grad(_scalar(value, inputs, op), (hidden, weight))
    return value.detach(), grad_h, grad_w


def _dense(hidden, weight, inputs: Inputs, op: str, logits_dtype) -> torch.Tensor:
    logits = (hidden @ weight.T).to(logits_dtype)  # (N, V)
    softmax_dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    if op == "ce":
        per_token = F.cross_entropy(
            logits.to(softmax_dtype), inputs.labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        token_weights = inputs.token_weights.to(softmax_dtype)
        return (per_token * token_weights).sum() / token_weights.sum()
    logprobs = torch.log_softmax(logits.to(softmax_dtype), dim=-1)
    picked = logprobs.gather(1, inputs.labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(inputs.labels != IGNORE_INDEX, picked, 0.0)  # (N,)


def _scalar(value: torch.Tensor, inputs: Inputs, op: str) -> torch.Tensor:
    """The scalar differentiated: the loss itself, or Σ upstream·logprobs."""
    return value if op == "ce" else (value * inputs.upstream.to(value.dtype)).sum()


# ----------------------------------------------------------------------------- cases


def _autograd_case(name: str, inputs: Inputs, op: str, fn: Callable[[], torch.Tensor]) -> Case:
    """A case whose value comes from ``fn()`` and whose gradients come from autograd."""

    def forward():
        with torch.no_grad():
            return fn()

    def forward_backward():
        value = fn()
        _scalar(value, inputs, op).backward()
        return value

    def output():
        inputs.hidden.grad = inputs.weight.grad = None
        value = forward_backward().detach()
        return value, inputs.hidden.grad, inputs.weight.grad

    return Case(name, forward, forward_backward, output)


def _without_native(case: Case, name: str) -> Case:
    """``case`` run with the native CPU code off."""
    from drift_engine.ops import native

    def off(fn):
        def run():
            with native.disabled():
                return fn()

        return run

    return Case(name, off(case.forward), off(case.forward_backward), off(case.output))


def _floor_case(inputs: Inputs) -> Case:
    hidden, weight = inputs.hidden.detach(), inputs.weight.detach()

    def forward():
        return hidden @ weight.T

    def forward_backward():
        logits = hidden @ weight.T  # stands in for the grad-logits of the two other GEMMs
        return logits @ weight, logits.T @ hidden

    return Case("floor (GEMMs only)", forward, forward_backward, output=lambda: None)


def build_cases(impl: str, inputs: Inputs, op: str, chunk_size: int | None = None) -> list[Case]:
    """The table rows of one --impl entry (raises ImportError when its package is absent);
    ``chunk_size`` goes to the drift rows."""
    h, w, labels, tw = inputs.hidden, inputs.weight, inputs.labels, inputs.token_weights
    if impl == "floor":
        return [_floor_case(inputs)]
    if impl == "drift-torch-python":
        # The PyTorch backend with the native CPU code off (drift_engine/ops/native.py):
        # what runs where it is not built.
        cases = build_cases("drift-torch", inputs, op, chunk_size)
        return [_without_native(case, "drift torch, Python only") for case in cases]
    if impl in ("drift-triton", "drift-torch"):
        from drift_engine.ops import fused_linear_cross_entropy, fused_linear_logprobs

        backend = impl.removeprefix("drift-")
        if op == "logprobs":
            return [
                _autograd_case(
                    f"drift {backend}",
                    inputs,
                    op,
                    lambda: (
                        fused_linear_logprobs(
                            h, w, labels, impl=backend, chunk_size=chunk_size, check_labels=False
                        ).logprobs
                    ),
                )
            ]
        schedules = ["token_chunks", "vocab_slabs"] if backend == "triton" else ["auto"]
        return [
            _autograd_case(
                f"drift {backend}" + (f" ({schedule})" if backend == "triton" else ""),
                inputs,
                op,
                lambda schedule=schedule: fused_linear_cross_entropy(
                    h,
                    w,
                    labels,
                    token_weights=tw,
                    impl=backend,
                    schedule=schedule,
                    # the lean schedule sizes its slabs from chunk_size too: keep its own sizing
                    chunk_size=chunk_size if schedule != "vocab_slabs" else None,
                    check_labels=False,
                ),
            )
            for schedule in schedules
        ]
    if impl == "torch":
        # What a plain PyTorch trainer does: logits in the input dtype, fp32 softmax.
        return [
            _autograd_case(
                "PyTorch dense (fp32 logits)",
                inputs,
                op,
                lambda: _dense(h, w, inputs, op, logits_dtype=torch.float32),
            )
        ]
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
        return [
            _autograd_case(
                "Liger FLCE (reduction none × weights)",
                inputs,
                op,
                lambda: (loss_fn(w, h, labels) * tw).sum() / tw.sum(),
            )
        ]
    if impl in ("cce", "cce-exact"):
        from cut_cross_entropy import linear_cross_entropy

        extra = {"filter_eps": None} if impl == "cce-exact" else {}
        label = "Cut CE, filter_eps=None (exact)" if extra else "Cut CE default (grad filtering)"
        return [
            _autograd_case(
                label,
                inputs,
                op,
                lambda: (
                    (
                        linear_cross_entropy(h, w, labels, reduction="none", **extra).float() * tw
                    ).sum()
                    / tw.sum()
                ),
            )
        ]
    raise ValueError(f"unknown --impl {impl!r}; choose from {', '.join(ALL_IMPLS)}")


# ----------------------------------------------------------------------------- measuring


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples``."""
    samples = sorted(samples)
    quantile = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    return statistics.median(samples), quantile(0.2), quantile(0.8)


def time_ms(fn: Callable[[], object], inputs: Inputs, device: torch.device, reps: int):
    """(median, p20, p80) milliseconds of ``fn``; gradients are cleared before each call."""
    grads_of = [inputs.hidden, inputs.weight]
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=100, rep=400, grad_to_none=grads_of, quantiles=[0.5, 0.2, 0.8]
        )
        return median, p20, p80
    return time_round_robin([fn], inputs, reps)[0]["wall"]


def time_round_robin(fns: list[Callable[[], object]], inputs: Inputs, reps: int) -> list[dict]:
    """CPU timings of several functions measured in rounds, one call of each per round (after
    one untimed warm-up call each), so that all of them see the same load of a shared
    machine. Per function: ``wall`` and ``cpu`` (process time, all threads) as (median, p20,
    p80) milliseconds, and the per-round ``samples`` (wall ms, cpu ms)."""
    for fn in fns:
        inputs.hidden.grad = inputs.weight.grad = None
        fn()
    samples: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(reps):
        for index, fn in enumerate(fns):
            inputs.hidden.grad = inputs.weight.grad = None
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[index].append(
                ((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3)
            )
    inputs.hidden.grad = inputs.weight.grad = None
    return [
        {
            "wall": _quantiles([w for w, _ in rows]),
            "cpu": _quantiles([c for _, c in rows]),
            "samples": rows,
        }
        for rows in samples
    ]


def _resident_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_resident() -> bool:
    """Reset this process's VmHWM to its current VmRSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_gb(fn: Callable[[], object], inputs: Inputs, device: torch.device):
    """Peak bytes above what was live before the call (GB): the CUDA allocator's peak, or on
    CPU the process's peak resident set (None where it cannot be read)."""
    inputs.hidden.grad = inputs.weight.grad = None
    if device.type != "cuda":
        import gc

        gc.collect()
        if not _reset_peak_resident():
            return None
        base = _resident_bytes("VmRSS")
        result = fn()
        peak = _resident_bytes("VmHWM")
        del result
        inputs.hidden.grad = inputs.weight.grad = None
        return None if base is None or peak is None else max(0, peak - base) / 1e9
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    inputs.hidden.grad = inputs.weight.grad = None
    return peak / 1e9


def _rel_err(actual, truth) -> float:
    return ((actual.to(truth.dtype) - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def measure(
    case: Case, inputs: Inputs, ref, device: torch.device, reps: int, timed: dict | None = None
) -> dict:
    """A row of the table; ``timed``: the row's round-robin CPU timings, when measured so."""
    row = {"impl": case.name}
    if timed is None:
        row["fwd_ms"] = time_ms(case.forward, inputs, device, reps)
        row["fwd_bwd_ms"] = time_ms(case.forward_backward, inputs, device, reps)
    else:
        row.update(timed)
    row["peak_gb"] = peak_memory_gb(case.forward_backward, inputs, device)
    out = case.output()
    if out is not None:
        value, grad_h, grad_w = out
        row["value_rel_err"] = _rel_err(value, ref[0])
        row["grad_rel_err"] = max(_rel_err(grad_h, ref[1]), _rel_err(grad_w, ref[2]))
    inputs.hidden.grad = inputs.weight.grad = None
    return row


def cpu_timings(cases: list[Case], inputs: Inputs, reps: int) -> list[dict]:
    """Round-robin CPU timings of the cases' forward, then of their forward+backward, with
    each row's per-round ratios to the floor row (when there is one)."""
    fwd = time_round_robin([c.forward for c in cases], inputs, reps)
    fb = time_round_robin([c.forward_backward for c in cases], inputs, reps)
    floor = next((i for i, c in enumerate(cases) if c.name.startswith("floor")), None)
    rows = []
    for index in range(len(cases)):
        row = {
            "fwd_ms": fwd[index]["wall"],
            "fwd_bwd_ms": fb[index]["wall"],
            "fwd_cpu_ms": fwd[index]["cpu"],
            "fwd_bwd_cpu_ms": fb[index]["cpu"],
        }
        if floor is not None:
            for key, timing in (("fwd", fwd), ("fwd_bwd", fb)):
                pairs = zip(timing[index]["samples"], timing[floor]["samples"], strict=True)
                row[f"{key}_vs_floor"] = _quantiles([w / fw for (w, _), (fw, _) in pairs])
                pairs = zip(timing[index]["samples"], timing[floor]["samples"], strict=True)
                row[f"{key}_cpu_vs_floor"] = _quantiles([c / fc for (_, c), (_, fc) in pairs])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reporting


def markdown(
    rows: list[dict], preset_name: str, preset: Preset, op: str, chunk_size: int | None = None
) -> str:
    n, h, v = preset.num_tokens, preset.hidden_size, preset.vocab_size
    chunking = f", drift chunk_size={chunk_size}" if chunk_size else ""
    floor = next((r for r in rows if r["impl"].startswith("floor") and "error" not in r), None)
    # CPU rows were timed round-robin: their ratios are medians of per-round ratios, and
    # the process's CPU time comes next to the wall time.
    cpu = any("fwd_bwd_cpu_ms" in r for r in rows)
    threads = f", {torch.get_num_threads()} threads" if cpu else ""
    lines = [
        f"### {op}: {preset_name} (N={n} H={h} V={v}, "
        f"{str(preset.dtype).removeprefix('torch.')}{chunking}{threads})",
        "",
        "| impl | fwd ms (p20–p80) | fwd+bwd ms (p20–p80) | × floor (fwd / fwd+bwd) "
        + ("| fwd+bwd CPU-time ms (p20–p80) | × floor, CPU time (fwd / fwd+bwd) " if cpu else "")
        + "| TFLOP/s (fwd / fwd+bwd) | peak GB | value err | grad err |",
        "|---|---|---|---|" + ("---|---|" if cpu else "") + "---|---|---|---|",
    ]
    fmt_t = lambda t: f"{t[0]:.2f} ({t[1]:.2f}–{t[2]:.2f})"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['error']} | | | | | | |" + (" | |" if cpu else ""))
            continue
        fwd, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        if "fwd_bwd_vs_floor" in r:
            ratio = f"{r['fwd_vs_floor'][0]:.2f} / {r['fwd_bwd_vs_floor'][0]:.2f}"
            cpu_ratio = f"{r['fwd_cpu_vs_floor'][0]:.2f} / {r['fwd_bwd_cpu_vs_floor'][0]:.2f}"
        elif floor:
            ratio = f"{fwd[0] / floor['fwd_ms'][0]:.2f} / {fb[0] / floor['fwd_bwd_ms'][0]:.2f}"
            cpu_ratio = "–"
        else:
            ratio = cpu_ratio = "–"
        tflops = f"{2 * n * h * v / fwd[0] / 1e9:.3g} / {6 * n * h * v / fb[0] / 1e9:.3g}"
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "–"
        value_err = f"{r['value_rel_err']:.1e}" if "value_rel_err" in r else "–"
        grad_err = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "–"
        cpu_cols = f"| {fmt_t(r['fwd_bwd_cpu_ms'])} | {cpu_ratio} " if cpu else ""
        lines.append(
            f"| {r['impl']} | {fmt_t(fwd)} | {fmt_t(fb)} | {ratio} {cpu_cols}| {tflops} | {peak} "
            f"| {value_err} | {grad_err} |"
        )
    return "\n".join(lines)


def _cpu_name() -> str:
    from train_throughput import _cpu_name as cpu_name  # bench/ is on sys.path

    return cpu_name()


def _native_status() -> str:
    """Whether the "drift-torch" rows ran the native CPU cross-entropy."""
    from drift_engine.ops import native

    return f"loaded {native.library_file().name}" if native.available() else "not built"


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "native_cpu_cross_entropy": _native_status(),
    }
    for package in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            module = __import__(package)
            env[package] = getattr(module, "__version__", "installed")
        except ImportError:
            env[package] = None
    return env


def run(
    preset_name: str,
    impls: list[str],
    ops: list[str],
    reps: int,
    chunk_size: int | None = None,
    threads: int | None = None,
) -> dict:
    preset = PRESETS[preset_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = threads or preset.threads
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    inputs = make_inputs(preset, device)
    report = {
        "env": environment(device),
        "preset": preset_name,
        "chunk_size": chunk_size,
        "ops": {},
    }
    report["shape"] = {
        "N": preset.num_tokens,
        "H": preset.hidden_size,
        "V": preset.vocab_size,
        "dtype": str(preset.dtype).removeprefix("torch."),
    }
    # float64 on CPU, where it is affordable; fp32 on CUDA (the presets' logits in float64
    # would not fit beside the rows measured).
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    report["reference_dtype"] = str(ref_dtype).removeprefix("torch.")
    for op in ops:
        ref = reference(inputs, op, ref_dtype)
        rows = []
        entries = []  # (position in rows, case) of the cases still to measure
        for impl in impls:
            if op == "logprobs" and impl not in LOGPROB_IMPLS:
                continue
            try:
                cases = build_cases(impl, inputs, op, chunk_size)
            except ImportError as error:
                rows.append({"impl": impl, "error": f"not importable ({error.name or error})"})
                continue
            for case in cases:
                entries.append((len(rows), case))
                rows.append(None)
        timings = {}
        if device.type == "cpu":
            try:
                measured = cpu_timings([case for _, case in entries], inputs, reps)
                timings = {pos: t for (pos, _), t in zip(entries, measured, strict=True)}
            except Exception as error:  # a failing row: time the others one by one
                print(f"round-robin timing failed ({type(error).__name__}: {error})")
        for pos, case in entries:
            try:
                rows[pos] = measure(case, inputs, ref, device, reps, timings.get(pos))
            except Exception as error:  # an OOM or a failing baseline keeps the others
                message = str(error).splitlines()[0][:120] if str(error) else ""
                rows[pos] = {"impl": case.name, "error": f"{type(error).__name__}: {message}"}
            finally:
                inputs.hidden.grad = inputs.weight.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del ref
        report["ops"][op] = rows
        print(markdown(rows, preset_name, preset, op, chunk_size), "\n", flush=True)
    report["env"]["threads"] = torch.get_num_threads()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument(
        "--impl",
        default=",".join(DEFAULT_IMPLS),
        help=f"comma-separated subset of {','.join(ALL_IMPLS)} (default: all but drift-torch-python)",
    )
    parser.add_argument("--op", choices=["ce", "logprobs", "all"], default="all")
    parser.add_argument("--json", help="write the results (with device and versions) here")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds on CPU")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: the preset's, else torch's)"
    )
    parser.add_argument(
        "--chunk-size", type=int, help="chunk_size of the drift rows (default: from the budget)"
    )
    args = parser.parse_args(argv)

    impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    unknown = sorted(set(impls) - set(ALL_IMPLS))
    if unknown:
        parser.error(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(ALL_IMPLS)}")
    if not torch.cuda.is_available():
        # Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen
        # before any kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ops = ["ce", "logprobs"] if args.op == "all" else [args.op]
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"device: {env['device']}; native CPU cross-entropy: {env['native_cpu_cross_entropy']}\n"
    )
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    report = run(args.preset, impls, ops, args.reps, args.chunk_size, args.threads)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
