"""Where a training step's time goes: a profiler breakdown of the trainer's steps.

Runs the trainer (``drift_engine.train.Trainer``) on the synthetic trajectories of
``bench/train_throughput.py`` and profiles a few optimizer steps after a warmup. Device
kernel time (CUDA) or operator self time (CPU) is grouped into categories by kernel name:

    gemm         cuBLAS / CUTLASS matrix products (the model's linears, the loss GEMMs)
    attention    flash / memory-efficient / varlen attention kernels and SDPA ops
    loss         the fused loss: its row kernels and its own GEMMs
    optimizer    fused AdamW and the gradient-norm / clipping kernels
    elementwise  everything memory-bound the decoder layers launch (norms, RoPE, SiLU·mul,
                 residual adds, dtype casts, copies), compiled (triton_*) kernels included
    other        what matched nothing above

and reported per step with its share, next to the step's wall time: the gap between the
wall time and the busy device time is host overhead (launch-bound work, synchronisation).

    python bench/profile_train.py --preset cpu
    python bench/profile_train.py --preset gpu [--compile] --json profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (sibling benchmark: presets, data, model configs)

# Scopes: an operator inside one of these (itself or an ancestor in the profiler's call
# tree) is counted there whatever its kernels are: the loss's GEMMs are loss time.
SCOPES: list[tuple[str, re.Pattern]] = [
    # the Python autograd Functions, the native ops and the native autograd node
    ("loss", re.compile(r"linearcrossentropy|linearlogprobs|drift_engine_native::|weightedcrossentropy")),
    ("optimizer", re.compile(r"optimizer\.|clip_grad|_foreach_norm|fused_adam")),
    ("attention", re.compile(r"attention|attn|flash|varlen")),
]

# Otherwise by kernel (CUDA) or operator (CPU) name; first match wins, names lower-cased.
CATEGORIES: list[tuple[str, re.Pattern]] = [
    ("loss", re.compile(r"_ce_rows|_logprob|_rows_kernel")),
    ("attention", re.compile(r"flash|fmha|attention|varlen|attn")),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach")),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|\bmm\b|addmm|matmul|bmm|^sm\d+_")),
    (
        "elementwise",
        re.compile(
            r"elementwise|vectorized|reduce|triton_|copy|cast|cat|index|embedding|"
            r"silu|mul|add|pow|rsqrt|mean|neg|where|fill|zero|norm|softmax|scatter|gather|"
            r"sqrt|exp|div|sum|lerp|all|any|isneginf|clamp"
        ),
    ),
]


def _match(patterns: list[tuple[str, re.Pattern]], name: str) -> str | None:
    lowered = name.lower()
    for label, pattern in patterns:
        if pattern.search(lowered):
            return label
    return None


def scope_of(event) -> str | None:
    """The scope of a profiler event: its own or its nearest ancestor's."""
    while event is not None:
        label = _match(SCOPES, event.name)
        if label:
            return label
        event = event.cpu_parent
    return None


def category(name: str) -> str:
    return _match(CATEGORIES, name) or "other"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(train_throughput.PRESETS), default="cpu")
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--compile", action="store_true", help="compiled decoder layers")
    parser.add_argument("--top", type=int, default=25, help="kernels listed by time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    preset = dict(train_throughput.PRESETS[args.preset], compile=args.compile)
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("the gpu preset needs CUDA")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, data, _, _ = train_throughput.write_workspace(
            tmp, preset, args.trajectories, args.seed
        )
        trainer = train_throughput.make_trainer(
            model_dir, data, tmp / "out", preset, device, args.seed
        )
        batches = trainer.epoch_plan(0).micro_batches
        needed = args.warmup + args.steps
        if len(batches) < needed:
            parser.error(f"{len(batches)} micro-batches; raise --trajectories to get {needed}")
        for micro_batch in batches[: args.warmup]:
            trainer.train_step([micro_batch])
        train_throughput._sync(device)

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        tokens = 0
        graphs_before = train_throughput._compiled_graphs()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for micro_batch in batches[args.warmup : needed]:
                tokens += trainer.train_step([micro_batch])["tokens"]
            train_throughput._sync(device)
            wall_s = time.perf_counter() - start

    report = breakdown(prof, device, wall_s, args.steps, tokens, args.top)
    report.update(
        preset=args.preset,
        compile=args.compile,
        device=_device_name(device),
        # a compile inside the profiled steps would dominate them: raise --warmup then
        graphs_compiled_while_profiled=train_throughput._compiled_graphs() - graphs_before,
    )
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def breakdown(prof, device: torch.device, wall_s: float, steps: int, tokens: int, top: int):
    """Per-step milliseconds by category and the ``top`` kernels (or CPU operators)."""
    on_gpu = device.type == "cuda"
    per_name: dict[str, float] = defaultdict(float)  # microseconds over all profiled steps
    calls: dict[str, int] = defaultdict(int)
    category_of: dict[str, str] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if on_gpu:  # the kernels this operator launched itself
            timed = [(kernel.name, kernel.duration) for kernel in event.kernels]
        else:
            timed = [(event.name, event.self_cpu_time_total)]
        scope = scope_of(event)
        for name, us in timed:
            if us <= 0 or name.startswith("ProfilerStep"):
                continue
            label = scope or category(name)
            key = f"{name} [{label}]"  # one kernel may be counted in several scopes
            per_name[key] += us
            calls[key] += 1
            category_of[key] = label
    if on_gpu:
        # Device work no operator claimed (launched outside any profiled operator): counted
        # from the device's own events so that nothing silently drops out of the total.
        device_us = sum(
            event.device_time_total
            for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CUDA
        )
        unattributed = device_us - sum(per_name.values())
        if unattributed > 0.01 * device_us:
            per_name["(launched outside any operator) [other]"] = unattributed
            calls["(launched outside any operator) [other]"] = 0
            category_of["(launched outside any operator) [other]"] = "other"
    by_category: dict[str, float] = defaultdict(float)
    for name, us in per_name.items():
        by_category[category_of[name]] += us
    busy_us = sum(per_name.values())
    per_step = lambda us: us / 1e3 / steps  # noqa: E731  (µs in total -> ms per step)
    return {
        "steps": steps,
        "tokens": tokens,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "tokens_per_s": tokens / wall_s,
        "busy_ms_per_step": per_step(busy_us),
        "timer": "device kernel time" if on_gpu else "CPU operator self time",
        "categories": {
            name: {"ms_per_step": per_step(us), "share": us / busy_us if busy_us else 0.0}
            for name, us in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {
                "name": name,
                "category": category_of[name],
                "ms_per_step": per_step(us),
                "calls_per_step": calls[name] / steps,
            }
            for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


def markdown(report: dict) -> str:
    lines = [
        f"## Training step profile ({report['preset']} preset"
        + (", compiled layers" if report["compile"] else "")
        + f", {report['device']})",
        "",
        f"{report['steps']} steps, {report['tokens']:,} tokens: "
        f"{report['wall_ms_per_step']:.1f} ms wall per step ({report['tokens_per_s']:,.0f} "
        f"tokens/s); {report['timer']}: {report['busy_ms_per_step']:.1f} ms per step; "
        f"{report['graphs_compiled_while_profiled']} graphs compiled meanwhile.",
        "",
        "| category | ms / step | share |",
        "|---|---|---|",
    ]
    for name, row in report["categories"].items():
        lines.append(f"| {name} | {row['ms_per_step']:.2f} | {100 * row['share']:.1f}% |")
    lines += [
        "",
        "| kernel / operator | category | ms / step | calls / step |",
        "|---|---|---|---|",
    ]
    for row in report["top"]:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(
            f"| `{name}` | {row['category']} | {row['ms_per_step']:.2f} | "
            f"{row['calls_per_step']:.0f} |"
        )
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return train_throughput._cpu_name()


if __name__ == "__main__":
    main(sys.argv[1:])
