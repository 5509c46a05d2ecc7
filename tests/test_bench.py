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


def _first_packed_batch(tmp_path):
    """The train-throughput benchmark's CPU workspace, its trainer and first micro-batch."""
    import torch

    train_throughput = _load("train_throughput")
    preset = dict(train_throughput.PRESETS["cpu"], compile=False)
    model_dir, data, _, _ = train_throughput.write_workspace(tmp_path, preset, 16, seed=0)
    cpu = torch.device("cpu")
    trainer = train_throughput.make_trainer(model_dir, data, tmp_path / "out", preset, cpu, 0)
    return (
        train_throughput,
        model_dir,
        trainer,
        trainer.pack_micro_batch(trainer.epoch_plan(0).micro_batches[0]),
    )


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
            assert row["grad_rel_err"] < 1e-4, row  # fp32 preset against the float64 reference
            # CPU rows are timed round-robin: per-round ratios to the floor, CPU time too.
            assert row["fwd_bwd_vs_floor"][0] > 0 and row["fwd_bwd_cpu_vs_floor"][0] > 0, row
            assert row["fwd_bwd_cpu_ms"][0] > 0, row
            if sys.platform == "linux":
                assert row["peak_gb"] is not None, row
    assert report["reference_dtype"] == "float64"


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
    # Plain transformers on the trainer's packed micro-batches: same tokens, same steps.
    hf = report["hf_packed"]
    assert hf["real_tokens"] == ours["real_tokens"] and hf["padding_fraction"] == 0
    assert hf["optimizer_steps"] == ours["optimizer_steps"]
    assert report["speedup_vs_hf_packed"] == pytest.approx(
        ours["real_tokens_per_s"] / hf["real_tokens_per_s"]
    )
    assert report["cpu_time_speedup"]["hf_packed"] == pytest.approx(
        ours["real_tokens_per_cpu_s"] / hf["real_tokens_per_cpu_s"]
    )
    # On CPU the peer's loss is the dense one (Liger's kernels need CUDA), and says so.
    assert hf["loss"] == "dense fp32 logits" and hf["attention"] == "sdpa"
    assert "HF packed + sdpa (dense fp32 logits)" in train_throughput.markdown(report)
    # The LM head runs only on the trained (last-turn) tokens: fewer FLOPs executed.
    assert 0 < report["setup"]["trained_tokens"] < report["setup"]["tokens"]
    assert 0 < ours["executed_tflops_per_s"] < ours["tflops_per_s"]

    alone = train_throughput.main(
        ["--preset", "cpu", "--trajectories", "8", "--no-reference", "--no-hf-packed"]
    )
    assert alone["reference"] is None and alone["speedup"] is None
    assert alone["hf_packed"] is None and alone["speedup_vs_hf_packed"] is None
    assert alone["drift_engine"]["real_tokens"] == alone["setup"]["tokens"]


def test_hf_packed_side_computes_the_trainers_loss(tmp_path):
    """The plain-transformers packed side trains the trainer's objective: on a micro-batch of
    several sequences its loss equals the trainer's fused one (so transformers' packed-sequence
    mask keeps the sequences apart)."""
    import torch
    from transformers import AutoModelForCausalLM

    from drift_engine.models.loss import weighted_sft_loss

    train_throughput, model_dir, trainer, batch = _first_packed_batch(tmp_path)
    assert batch.num_trajectories > 1
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    with torch.no_grad():
        expected = weighted_sft_loss(trainer.model, batch)
        actual = train_throughput.hf_packed_loss(model, batch)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_profile_train_cpu_preset(tmp_path):
    profile_train = _load("profile_train")
    report = profile_train.main(
        ["--preset", "cpu", "--trajectories", "24", "--warmup", "1", "--steps", "1"]
    )
    categories = report["categories"]
    # The fused loss and AdamW are found by their scopes, whatever their operators are.
    assert {"gemm", "loss", "optimizer"} <= set(categories)
    assert categories["loss"]["ms_per_step"] > 0 and categories["optimizer"]["ms_per_step"] > 0
    assert report["graphs_compiled_while_profiled"] == 0
    assert report["tokens"] > 0 and report["wall_ms_per_step"] > 0


class _Kernel:
    def __init__(self, name: str, duration: float):
        self.name, self.duration = name, duration


class _Event:
    """The attributes of a profiler FunctionEvent that the breakdown reads."""

    def __init__(self, name, parent=None, kernels=(), device_type=None, device_us=0.0):
        import torch

        self.name, self.cpu_parent = name, parent
        self.kernels = [_Kernel(*k) for k in kernels]
        self.device_type = device_type or torch.autograd.DeviceType.CPU
        self.device_time_total = device_us
        self.self_cpu_time_total = 0.0


def test_profile_breakdown_attributes_cuda_kernels_by_scope_and_name():
    """CUDA side: a kernel counts in its operator's scope (loss, optimizer) before its own
    name; device time that no operator launched is reported as such, not dropped."""
    import torch

    profile_train = _load("profile_train")
    cuda = torch.autograd.DeviceType.CUDA
    loss = _Event("WeightedLinearCrossEntropy")
    adamw = _Event("Optimizer.step#AdamW.step")
    events = [
        loss,
        _Event("aten::mm", loss, [("nvjet_hsh_gemm", 300.0)]),  # the loss's GEMM
        _Event("aten::mm", None, [("nvjet_hsh_gemm", 500.0)]),  # a linear layer's
        _Event("aten::add", None, [("vectorized_elementwise_kernel", 100.0)]),
        _Event("aten::_fused_adamw_", adamw, [("multi_tensor_apply_kernel", 60.0)]),
        _Event("aten::_flash_attention_forward", None, [("flash_fwd_kernel", 40.0)]),
        # what the device itself recorded: the kernels above plus 100 µs launched outside
        _Event("device", device_type=cuda, device_us=1100.0),
    ]

    class Profile:
        def events(self):
            return events

    report = profile_train.breakdown(
        Profile(), torch.device("cuda"), wall_s=0.004, steps=2, tokens=1000, top=10
    )
    ms = {name: row["ms_per_step"] for name, row in report["categories"].items()}
    assert ms == pytest.approx(
        {
            "gemm": 0.25,
            "loss": 0.15,
            "elementwise": 0.05,
            "optimizer": 0.03,
            "attention": 0.02,
            "other": 0.05,
        }  # fmt: skip
    )
    assert report["busy_ms_per_step"] == pytest.approx(0.55)
    assert report["tokens_per_s"] == pytest.approx(250_000)


def test_liger_loss_is_cuda_only_and_labelled():
    import torch

    train_throughput = _load("train_throughput")
    assert train_throughput.liger_loss(torch.device("cpu")) == (None, "dense fp32 logits")


def test_liger_weighted_loss_matches_ours(tmp_path):
    """The GPU peer's loss, Liger's fused linear cross-entropy with reduction "none" times the
    token weights, is the trainer's objective: on a packed micro-batch (Liger's Triton
    kernels in the interpreter on CPU) it equals the dense side's loss, and at a tiny shape
    its loss and gradients equal drift-engine's fused loss."""
    pytest.importorskip("liger_kernel")
    import torch
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    from transformers import AutoModelForCausalLM

    from drift_engine.ops import fused_linear_cross_entropy

    liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=gen).requires_grad_()
    weight = (torch.randn(37, 16, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, 37, (13,), generator=gen)
    labels[[2, 5]] = -100
    token_weights = torch.rand(13, generator=gen)
    theirs = (liger(weight, hidden, labels) * token_weights).sum()
    ours = fused_linear_cross_entropy(
        hidden, weight, labels, token_weights=token_weights, reduction="sum", impl="torch"
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        torch.autograd.grad(theirs, (hidden, weight)),
        torch.autograd.grad(ours, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    train_throughput, model_dir, trainer, batch = _first_packed_batch(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    with torch.no_grad():
        dense = train_throughput.hf_packed_loss(model, batch)
        fused = train_throughput.hf_packed_loss(model, batch, liger)
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-5)
