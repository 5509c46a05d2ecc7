"""fused_linear_logprobs (functional API, autograd, nn wrapper, validation).

Log-probs, entropies and the gradients of Σ a·logprob + b·entropy for random upstream
gradients a, b are compared with the float64 dense reference; the allowed error is twice
PyTorch's own error on the same inputs (dense logits in the inputs' dtype, fp32 softmax)
plus a few units in the last place of the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import requires_kernels

from drift_engine import FusedLinearLogProbs, LogProbs, fused_linear_logprobs
from drift_engine.errors import DriftError
from drift_engine.ops.reference import logprobs_reference

IGNORE = -100


TRITON = pytest.param("triton", marks=requires_kernels("logprobs"))


# Triton runs on the GPU when there is one, else in the interpreter on CPU (tests/conftest.py);
# bf16 only on the GPU (the interpreter's bf16 dot is wrong). The torch backend runs on CPU.
IMPL_DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
TRITON_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if torch.cuda.is_available() else []
)


def make_inputs(num_tokens, hidden_size, vocab_size, dtype, *, bias=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen) / hidden_size**0.25
    weight = 2 * torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.25
    bias_t = torch.randn(vocab_size, generator=gen) if bias else None
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    labels[torch.rand(num_tokens, generator=gen) < 0.2] = IGNORE
    cast = lambda t: None if t is None else t.to(device, dtype)
    return cast(hidden), cast(weight), cast(bias_t), labels.to(device)


def assert_within_pytorch_error(actual, truth, baseline, what):
    truth = truth.detach().double()
    actual_error = (actual.detach().double() - truth).abs().max().item()
    baseline_error = (baseline.detach().double() - truth).abs().max().item()
    margin = 4 * torch.finfo(actual.dtype).eps * max(truth.abs().max().item(), 1e-3)
    assert actual_error <= 2 * baseline_error + margin, (
        f"{what}: error {actual_error:.3e} > 2 x PyTorch's {baseline_error:.3e} + {margin:.3e}"
    )


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run_and_compare(impl, dtype, shape, *, temperature, bias, upstream, chunk_size=16):
    """upstream: which outputs receive a (random, sign-changing) gradient."""
    hidden, weight, bias_t, labels = make_inputs(*shape, dtype, bias=bias, device=IMPL_DEVICE[impl])
    gen = torch.Generator().manual_seed(7)
    grad_logprobs = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(shape[0], generator=gen, dtype=torch.float64)

    def run(fn, cast, **extra):
        h, w, b = leaves(*(None if t is None else cast(t) for t in (hidden, weight, bias_t)))
        out = fn(h, w, labels, bias=b, temperature=temperature, **extra)
        objective = 0
        if "logprobs" in upstream:
            objective = (
                objective
                + (out.logprobs * grad_logprobs.to(out.logprobs.device, out.logprobs.dtype)).sum()
            )
        if "entropy" in upstream:
            objective = (
                objective
                + (out.entropy * grad_entropy.to(out.entropy.device, out.entropy.dtype)).sum()
            )
        inputs = [t for t in (h, w, b) if t is not None]
        return out, torch.autograd.grad(objective, inputs)

    out, grads = run(
        fused_linear_logprobs, lambda t: t, impl=impl, chunk_size=chunk_size, return_entropy=True
    )
    truth, truth_grads = run(logprobs_reference, lambda t: t.double())
    base, base_grads = run(logprobs_reference, lambda t: t, logits_dtype=torch.float32)

    assert isinstance(out, LogProbs)
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    assert torch.all(out.logprobs[labels == IGNORE] == 0)
    assert_within_pytorch_error(out.logprobs, truth.logprobs, base.logprobs, "logprobs")
    assert_within_pytorch_error(out.entropy, truth.entropy, base.entropy, "entropy")
    for name, grad, truth_grad, base_grad in zip(
        ("hidden", "weight", "bias")[: len(grads)], grads, truth_grads, base_grads, strict=True
    ):
        assert grad.dtype == dtype, name
        assert_within_pytorch_error(grad, truth_grad, base_grad, f"grad {name} ({upstream})")


UPSTREAMS = {"both": ("logprobs", "entropy"), "logprobs": ("logprobs",), "entropy": ("entropy",)}
SHAPES = [(1, 13, 251), (97, 24, 509)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("upstream", list(UPSTREAMS))
def test_torch_backend_matches_reference(upstream, temperature, shape, dtype):
    run_and_compare(
        "torch",
        dtype,
        shape,
        temperature=temperature,
        bias=shape[0] > 1,
        upstream=UPSTREAMS[upstream],
    )


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("upstream", ["both", "logprobs"])
@pytest.mark.parametrize("impl", [TRITON])
def test_triton_backend_matches_reference(impl, upstream, dtype):
    run_and_compare(
        impl, dtype, (45, 20, 131), temperature=0.8, bias=True, upstream=UPSTREAMS[upstream]
    )


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_entropy_only_when_asked(impl):
    hidden, weight, _, labels = make_inputs(10, 16, 37, torch.float32, device=IMPL_DEVICE[impl])
    out = fused_linear_logprobs(hidden, weight, labels, impl=impl)
    assert isinstance(out, LogProbs) and out.entropy is None
    with_entropy = fused_linear_logprobs(hidden, weight, labels, impl=impl, return_entropy=True)
    torch.testing.assert_close(out.logprobs, with_entropy.logprobs, rtol=0, atol=0)


def test_logprobs_are_minus_cross_entropy():
    from drift_engine import fused_linear_cross_entropy

    hidden, weight, bias, labels = make_inputs(40, 16, 67, torch.float32, bias=True)
    logprobs = fused_linear_logprobs(hidden, weight, labels, bias=bias, impl="torch").logprobs
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, bias=bias, reduction="none", impl="torch"
    )
    torch.testing.assert_close(logprobs, -loss, rtol=1e-6, atol=1e-6)


def test_all_ignored_rows_have_zero_logprob_gradient():
    hidden, weight, _, labels = make_inputs(8, 16, 29, torch.float32)
    labels = torch.full_like(labels, IGNORE)
    h, w = leaves(hidden, weight)
    out = fused_linear_logprobs(h, w, labels, impl="torch")
    assert torch.equal(out.logprobs, torch.zeros(8))
    out.logprobs.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_non_contiguous_inputs():
    hidden, weight, _, labels = make_inputs(30, 16, 61, torch.float32)
    expected = fused_linear_logprobs(hidden, weight, labels, impl="torch", return_entropy=True)
    wide = torch.zeros(60, 32)
    wide[::2, 1::2] = hidden
    weight_t = weight.T.contiguous().T
    actual = fused_linear_logprobs(
        wide[::2, 1::2],
        weight_t,
        labels.repeat_interleave(2)[::2],
        impl="torch",
        return_entropy=True,
    )
    torch.testing.assert_close(actual.logprobs, expected.logprobs)
    torch.testing.assert_close(actual.entropy, expected.entropy)


def test_module_wrapper_matches_functional():
    hidden, weight, bias, labels = make_inputs(12, 16, 31, torch.float32, bias=True)
    module = FusedLinearLogProbs(temperature=0.5, return_entropy=True, impl="torch")
    expected = fused_linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=0.5, return_entropy=True, impl="torch"
    )
    actual = module(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(actual.logprobs, expected.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(actual.entropy, expected.entropy, rtol=0, atol=0)
    with pytest.raises(DriftError, match="temperature"):
        FusedLinearLogProbs(temperature=0.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(impl="gpu"), "impl='gpu'"),
        (dict(chunk_size=-2), "chunk_size"),
        (dict(labels=torch.full((6,), 17)), "outside \\[0, 17\\)"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must be 1-D"),
        (dict(hidden=torch.randn(6, 8, dtype=torch.float64)), "supported dtypes"),
        (dict(bias=torch.zeros(16)), "bias must have shape"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, message):
    hidden, weight, _, labels = make_inputs(6, 8, 17, torch.float32)
    call = dict(hidden=hidden, weight=weight, labels=labels) | change
    with pytest.raises(DriftError, match=message):
        fused_linear_logprobs(call.pop("hidden"), call.pop("weight"), call.pop("labels"), **call)
