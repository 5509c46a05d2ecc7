"""The benchmark scripts run end to end on their CPU presets and report consistent figures.

GPU sessions are short: a benchmark that breaks after a change must fail here, not there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # profile_train imports its sibling train_throughput
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_loss_kernel_cpu_preset_rows_are_accurate():
    loss_kernel = _load("loss_kernel")
    report = loss_kernel.run(
        "cpu-small", ["drift-triton", "drift-torch", "torch", "floor"], ["ce", "logprobs"], reps=1
    )
    for op in ("ce", "logprobs"):
        rows = {row["impl"]: row for row in report["ops"][op]}
        assert not [row for row in rows.values() if "error" in row], rows
        measured = [row for name, row in rows.items() if not name.startswith("floor")]
        # ce: the fast and the memory-lean Triton schedules, the torch backend, dense PyTorch
        assert len(measured) >= (4 if op == "ce" else 3)
        for row in measured:
            assert row["grad_rel_err"] < 1e-4, row  # fp32 preset against the fp32 reference


def test_train_throughput_cpu_preset(tmp_path):
    train_throughput = _load("train_throughput")
    out = tmp_path / "throughput.json"
    report = train_throughput.main(["--preset", "cpu", "--trajectories", "16", "--json", str(out)])
    assert json.loads(out.read_text())["speedup"] == pytest.approx(report["speedup"])
    reference, ours = report["reference"], report["drift_engine"]
    # Same trajectories on both sides; only the reference pads.
    assert reference["real_tokens"] == ours["real_tokens"] == report["setup"]["tokens"]
    assert reference["padding_fraction"] > 0 and ours["padding_fraction"] == 0
    assert reference["processed_tokens"] > reference["real_tokens"]
    assert report["speedup"] == pytest.approx(
        ours["real_tokens_per_s"] / reference["real_tokens_per_s"]
    )
    # The LM head runs only on the trained (last-turn) tokens: fewer FLOPs executed.
    assert 0 < report["setup"]["trained_tokens"] < report["setup"]["tokens"]
    assert 0 < ours["executed_tflops_per_s"] < ours["tflops_per_s"]


def test_profile_train_cpu_preset(tmp_path):
    profile_train = _load("profile_train")
    report = profile_train.main(
        ["--preset", "cpu", "--trajectories", "24", "--warmup", "1", "--steps", "1"]
    )
    categories = report["categories"]
    assert {"gemm", "loss", "optimizer"} <= set(categories)
    assert sum(row["share"] for row in categories.values()) == pytest.approx(1.0)
    total = sum(row["ms_per_step"] for row in categories.values())
    assert total == pytest.approx(report["busy_ms_per_step"])
    assert report["tokens"] > 0 and report["wall_ms_per_step"] > 0
