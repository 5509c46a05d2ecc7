"""fused_linear_cross_entropy (functional API, autograd, nn wrapper, validation).

Values and gradients are compared with the float64 dense reference. The allowed error is
PyTorch's own error on the same inputs (dense logits in the inputs' dtype, fp32 loss,
autograd) times 2, plus a margin of a few units in the last place of the output dtype.
The torch backend runs in fp32/fp16/bf16; the Triton backend (under the interpreter on CPU)
in fp32/fp16 on a smaller parametrisation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import linear_loss_inputs as make_inputs
from kernel_utils import requires_kernels

from drift_engine import FusedLinearCrossEntropy, fused_linear_cross_entropy
from drift_engine.errors import DriftError
from drift_engine.ops import CrossEntropyOptions, FusedOpError
from drift_engine.ops.reference import cross_entropy_reference

IGNORE = -100


TRITON = pytest.param("triton", marks=requires_kernels("cross_entropy"))


# Triton runs on the GPU when there is one, else in the interpreter on CPU (tests/conftest.py);
# bf16 only on the GPU (the interpreter's bf16 dot is wrong). The torch backend runs on CPU.
IMPL_DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
TRITON_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if torch.cuda.is_available() else []
)


def assert_within_pytorch_error(actual, truth, baseline, what, *, baseline_error=None):
    """|actual - truth| <= 2·(PyTorch's error) + a few ulps of actual's dtype at truth's scale.

    PyTorch's error is max|baseline - truth| unless given (for sums, see below)."""
    truth = truth.detach().double()
    actual_error = (actual.detach().double() - truth).abs().max().item()
    if baseline_error is None:
        baseline_error = (baseline.detach().double() - truth).abs().max().item()
    margin = 4 * torch.finfo(actual.dtype).eps * max(truth.abs().max().item(), 1e-3)
    assert actual_error <= 2 * baseline_error + margin, (
        f"{what}: error {actual_error:.3e} > 2 x PyTorch's {baseline_error:.3e} + {margin:.3e}"
    )


def scalar_loss_error_budget(hidden, weight, bias, labels, token_weights, reduction, options):
    """PyTorch's error on a weighted sum of per-token losses, accumulated without
    cancellation: Σ_i c_i·|ℓ_i(PyTorch) - ℓ_i(float64)|. The signed error of the sum is a
    random walk; comparing two random walks' end points directly would be luck."""
    rows = dict(token_weights=token_weights, bias=bias, reduction="none", **options)
    truth = cross_entropy_reference(
        hidden.double(),
        weight.double(),
        labels,
        **{**rows, "bias": None if bias is None else bias.double()},
    )
    base = cross_entropy_reference(hidden, weight, labels, logits_dtype=torch.float32, **rows)
    total = (base.double() - truth).abs().sum()
    if reduction == "mean":
        total = total / token_weights[labels != IGNORE].double().sum().clamp_min(1e-30)
    return total.item()


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run_and_compare(impl, dtype, shape, reduction, options, *, bias, chunk_size, seed=0):
    """Run the fused op, the float64 reference and PyTorch's same-dtype dense path on the
    same inputs and upstream gradient; check value and every gradient."""
    hidden, weight, bias_t, labels, token_weights = make_inputs(
        *shape, dtype, bias=bias, seed=seed, device=IMPL_DEVICE[impl]
    )
    kwargs = dict(token_weights=token_weights, reduction=reduction, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    if reduction == "none":
        # Non-uniform, sign-changing upstream gradient: a uniform one hides row-scaling bugs.
        upstream = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    else:
        upstream = torch.tensor(0.37, dtype=torch.float64)  # != 1: backward must scale

    def run(fn, cast, **extra):
        h, w, b = leaves(*(None if t is None else cast(t) for t in (hidden, weight, bias_t)))
        out = fn(h, w, labels, bias=b, **kwargs, **extra)
        grads = torch.autograd.grad(
            out, [t for t in (h, w, b) if t is not None], upstream.to(out.device, out.dtype)
        )
        return out, grads

    out, grads = run(fused_linear_cross_entropy, lambda t: t, impl=impl, chunk_size=chunk_size)
    truth, truth_grads = run(cross_entropy_reference, lambda t: t.double())
    base, base_grads = run(cross_entropy_reference, lambda t: t, logits_dtype=torch.float32)

    assert out.dtype == torch.float32
    assert out.shape == truth.shape
    budget = None
    if reduction != "none":
        budget = scalar_loss_error_budget(
            hidden, weight, bias_t, labels, token_weights, reduction, options
        )
    assert_within_pytorch_error(out, truth, base, f"loss ({reduction})", baseline_error=budget)
    for name, grad, truth_grad, base_grad in zip(
        ("hidden", "weight", "bias")[: len(grads)], grads, truth_grads, base_grads, strict=True
    ):
        assert grad.dtype == dtype, name
        assert torch.isfinite(grad).all(), name
        assert_within_pytorch_error(grad, truth_grad, base_grad, f"grad {name} ({reduction})")


OPTION_SETS = {
    "plain": {},
    "smooth_z_cap": dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
}
# (N, H, V): V prime, N = 1, H not a multiple of 16, N not a multiple of the chunk.
SHAPES = [(1, 13, 251), (97, 24, 509), (130, 33, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_backend_matches_reference(reduction, options, shape, dtype):
    run_and_compare(
        "torch", dtype, shape, reduction, OPTION_SETS[options], bias=shape[0] == 97, chunk_size=16
    )


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("options", ["plain", "smooth_z_cap"], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", [TRITON])
def test_triton_backend_matches_reference(impl, reduction, options, dtype):
    # Small enough for the Triton interpreter; bias on, several chunks with a remainder.
    run_and_compare(
        impl, dtype, (45, 20, 131), reduction, OPTION_SETS[options], bias=True, chunk_size=16
    )


def test_reference_matches_pytorch_cross_entropy():
    """The reference's semantics are PyTorch's (mean over non-ignored, label smoothing)."""
    hidden, weight, bias, labels, _ = make_inputs(64, 16, 101, torch.float64, bias=True)
    logits = hidden @ weight.T + bias
    for smoothing in (0.0, 0.2):
        for reduction in ("mean", "sum", "none"):
            expected = F.cross_entropy(
                logits, labels, ignore_index=IGNORE, reduction=reduction, label_smoothing=smoothing
            )
            actual = cross_entropy_reference(
                hidden, weight, labels, bias=bias, reduction=reduction, label_smoothing=smoothing
            )
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_token_weighted_mean_semantics(impl):
    """mean = Σ w·ℓ / Σ w over non-ignored rows; weights on ignored rows do not count."""
    hidden, weight, _, labels, token_weights = make_inputs(
        40, 16, 97, torch.float32, device=IMPL_DEVICE[impl]
    )
    token_weights[labels == IGNORE] = 1e6  # must not leak into the normaliser
    per_token = fused_linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
    valid = labels != IGNORE
    expected = (token_weights * per_token)[valid].sum() / token_weights[valid].sum()
    actual = fused_linear_cross_entropy(
        hidden, weight, labels, token_weights=token_weights, impl=impl
    )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    unweighted = fused_linear_cross_entropy(hidden, weight, labels, impl=impl)
    torch.testing.assert_close(unweighted, per_token[valid].mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(impl, reduction):
    hidden, weight, bias, labels, token_weights = make_inputs(
        12, 16, 53, torch.float32, bias=True, device=IMPL_DEVICE[impl]
    )
    labels = torch.full_like(labels, IGNORE)
    h, w, b = leaves(hidden, weight, bias)
    loss = fused_linear_cross_entropy(
        h,
        w,
        labels,
        token_weights=token_weights,
        bias=b,
        reduction=reduction,
        impl=impl,
        z_loss=1e-2,
        label_smoothing=0.1,
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for tensor in (h, w, b):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor.grad))


def test_empty_batch():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    loss = fused_linear_cross_entropy(hidden, weight, labels, impl="torch")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert fused_linear_cross_entropy(hidden, weight, labels, reduction="none").shape == (0,)


def test_non_contiguous_inputs_and_int32_labels():
    hidden, weight, bias, labels, token_weights = make_inputs(50, 24, 131, torch.float32, bias=True)
    expected = fused_linear_cross_entropy(
        hidden, weight, labels, token_weights=token_weights, bias=bias, impl="torch"
    )
    # Same values behind strided views: every other row / column of larger tensors, a
    # transposed weight, strided labels and weights.
    wide_hidden = torch.zeros(100, 48)
    wide_hidden[::2, ::2] = hidden
    weight_t = weight.T.contiguous().T  # (V, H) with strides (1, V)
    wide_bias = torch.zeros(262)
    wide_bias[::2] = bias
    wide_labels = torch.zeros(100, dtype=torch.int32)
    wide_labels[::2] = labels.int()
    wide_weights = torch.zeros(100)
    wide_weights[::2] = token_weights
    h = wide_hidden[::2, ::2].requires_grad_()
    assert not h.is_contiguous() and not weight_t.is_contiguous()
    w = weight_t.requires_grad_()
    actual = fused_linear_cross_entropy(
        h, w, wide_labels[::2], token_weights=wide_weights[::2], bias=wide_bias[::2], impl="torch"
    )
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    actual.backward()
    h_ref, w_ref = leaves(hidden, weight)
    fused_linear_cross_entropy(
        h_ref, w_ref, labels, token_weights=token_weights, bias=bias, impl="torch"
    ).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_chunk_size_does_not_change_the_result():
    hidden, weight, _, labels, token_weights = make_inputs(70, 16, 89, torch.float32)
    results = []
    for chunk_size in (1, 7, 70, None):
        h, w = leaves(hidden, weight)
        loss = fused_linear_cross_entropy(
            h, w, labels, token_weights=token_weights, chunk_size=chunk_size, impl="torch"
        )
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for loss, grad_h, grad_w in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_h, results[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_w, results[0][2], rtol=1e-5, atol=1e-7)


def test_only_requested_gradients_are_computed(monkeypatch):
    """The Python backend's passes (the native scalar loss has its own test in
    test_native.py)."""
    from drift_engine.ops import native, torch_impl

    monkeypatch.setattr(native, "available", lambda: False)

    calls = []  # row_coef given to each backend call: None means no gradient pass
    real_ce_forward = torch_impl.ce_forward

    def recording_ce_forward(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("row_coef"))
        return real_ce_forward(*args, **kwargs)

    monkeypatch.setattr(torch_impl, "ce_forward", recording_ce_forward)
    hidden, weight, _, labels, _ = make_inputs(20, 16, 41, torch.float32)
    for reduction in ("mean", "none"):
        h = hidden.clone().requires_grad_()
        fused_linear_cross_entropy(h, weight, labels, reduction=reduction).sum().backward()
        assert h.grad is not None and weight.grad is None
    # mean: one pass with gradients; none: forward without, backward with.
    assert [c is None for c in calls] == [False, True, False]

    calls.clear()
    with torch.no_grad():
        value = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    assert calls == [None] and not value.requires_grad
    torch.testing.assert_close(value, fused_linear_cross_entropy(hidden, weight, labels))


@pytest.mark.parametrize("native_code", [True, False], ids=["native", "python"])
def test_second_backward_through_scalar_loss_raises(native_code, monkeypatch):
    from drift_engine.ops import native

    if native_code and not native.available():
        pytest.skip("the native CPU cross-entropy is not built (drift-engine native build)")
    if not native_code:
        monkeypatch.setattr(native, "available", lambda: False)
    hidden, weight, _, labels, _ = make_inputs(20, 16, 41, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    # FusedOpError from Python, ValueError (its base class) from the native autograd node
    with pytest.raises(ValueError, match="backward ran twice"):
        loss.backward()


def test_module_wrapper_matches_functional():
    hidden, weight, bias, labels, token_weights = make_inputs(30, 16, 61, torch.float32, bias=True)
    module = FusedLinearCrossEntropy(
        reduction="sum", label_smoothing=0.1, softcap=5.0, impl="torch"
    )
    expected = fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        token_weights=token_weights,
        bias=bias,
        reduction="sum",
        label_smoothing=0.1,
        softcap=5.0,
        impl="torch",
    )
    actual = module(hidden, weight, labels, token_weights=token_weights, bias=bias)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert module.options == CrossEntropyOptions(
        reduction="sum", label_smoothing=0.1, softcap=5.0, impl="torch"
    )
    assert "reduction='sum'" in repr(module)
    # An options object, optionally overridden by keywords, serves as well.
    from_options = FusedLinearCrossEntropy(module.options, reduction="none")
    assert from_options.options.reduction == "none" and from_options.options.softcap == 5.0
    with pytest.raises(FusedOpError, match="reduction"):
        FusedLinearCrossEntropy(reduction="avg")
    with pytest.raises(FusedOpError, match="impl"):
        FusedLinearCrossEntropy(impl="cuda")


def _valid_call():
    hidden, weight, bias, labels, token_weights = make_inputs(6, 8, 17, torch.float32, bias=True)
    return dict(hidden=hidden, weight=weight, labels=labels, bias=bias, token_weights=token_weights)


def _with(**changes):
    def build():
        call = _valid_call()
        for key, value in changes.items():
            call[key] = value(call) if callable(value) else value
        return call

    return build


INVALID_CALLS = {
    "hidden_3d": (_with(hidden=lambda c: c["hidden"].unsqueeze(0)), "hidden must be 2-D"),
    "weight_1d": (_with(weight=lambda c: c["weight"][0]), "weight must be 2-D"),
    "hidden_size_mismatch": (_with(weight=lambda c: c["weight"][:, :5]), "does not match hidden"),
    "int_hidden": (
        _with(hidden=lambda c: c["hidden"].long(), weight=lambda c: c["weight"].long()),
        "supported dtypes",
    ),
    "dtype_mismatch": (_with(weight=lambda c: c["weight"].half()), "differs from hidden dtype"),
    "bias_shape": (_with(bias=lambda c: c["bias"][:-1]), "bias must have shape"),
    "bias_dtype": (_with(bias=lambda c: c["bias"].double()), "bias dtype"),
    "labels_2d": (_with(labels=lambda c: c["labels"].unsqueeze(1)), "labels must be 1-D"),
    "labels_length": (_with(labels=lambda c: c["labels"][:-1]), "labels must be 1-D"),
    "float_labels": (_with(labels=lambda c: c["labels"].float()), "integer tensor"),
    "label_too_large": (_with(labels=lambda c: c["labels"].fill_(17)), "outside \\[0, 17\\)"),
    "negative_label": (_with(labels=lambda c: c["labels"].fill_(-1)), "outside \\[0, 17\\)"),
    "token_weights_shape": (
        _with(token_weights=lambda c: c["token_weights"][:3]),
        "token_weights must have shape",
    ),
    "token_weights_int": (
        _with(token_weights=lambda c: c["token_weights"].long()),
        "floating point",
    ),
    "negative_token_weight": (
        _with(token_weights=lambda c: -c["token_weights"]),
        "negative or not finite",
    ),
    "nan_token_weight": (
        _with(token_weights=lambda c: c["token_weights"].fill_(float("nan"))),
        "negative or not finite",
    ),
    "reduction": (_with(reduction="avg"), "reduction='avg'"),
    "label_smoothing": (_with(label_smoothing=1.5), "label_smoothing"),
    "z_loss": (_with(z_loss=-1.0), "z_loss"),
    "softcap": (_with(softcap=0.0), "softcap"),
    "chunk_size": (_with(chunk_size=0), "chunk_size"),
    "schedule": (_with(schedule="rows"), "schedule"),
    "impl": (_with(impl="cuda"), "impl='cuda'"),
    "meta_weight": (_with(weight=lambda c: c["weight"].to("meta")), "weight is on meta"),
}


@pytest.mark.parametrize("case", list(INVALID_CALLS))
def test_invalid_inputs_raise_clear_errors(case):
    build, message = INVALID_CALLS[case]
    call = build()
    with pytest.raises(DriftError, match=message) as info:
        fused_linear_cross_entropy(
            call.pop("hidden"), call.pop("weight"), call.pop("labels"), **call
        )
    assert isinstance(info.value, ValueError)


def test_check_labels_false_skips_value_checks():
    call = _valid_call()
    call["token_weights"] = -call["token_weights"]  # rejected only by the value check
    loss = fused_linear_cross_entropy(
        call.pop("hidden"), call.pop("weight"), call.pop("labels"), check_labels=False, **call
    )
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    call = _valid_call()
    with pytest.raises(FusedOpError, match="TRITON_INTERPRET"):
        fused_linear_cross_entropy(call["hidden"], call["weight"], call["labels"], impl="triton")


def test_auto_uses_torch_backend_on_cpu():
    call = _valid_call()
    args = (call["hidden"], call["weight"], call["labels"])
    assert torch.equal(
        fused_linear_cross_entropy(*args, impl="auto"),
        fused_linear_cross_entropy(*args, impl="torch"),
    )


def test_narrow_row_lse_is_exact_when_the_loss_reads_it():
    """The narrow-row pass derives lse from log p[label]; with label smoothing or z-loss the
    loss reads lse, and a label far below the row's top logit (log p = -1000 here) would
    carry log p's rounding (6e-5) into it, so those losses take the max pass."""
    from drift_engine.ops import native, torch_impl

    hidden = torch.eye(4, 8)
    weight = torch.zeros(16, 8)
    weight[0, :4] = -1000.0  # logit -1000 at label 0 for every row, the others near 0
    weight[1:, :4] = torch.randn(15, 4) * 0.1
    labels = torch.zeros(4, dtype=torch.long)
    truth = torch.logsumexp(hidden.double() @ weight.double().T, dim=1)
    for opts in (CrossEntropyOptions(label_smoothing=0.1), CrossEntropyOptions(z_loss=1e-4)):
        with native.disabled(), torch.no_grad():
            _, lse, *_ = torch_impl.ce_forward(hidden, weight, None, labels, opts)
        assert (lse.double() - truth).abs().max().item() < 1e-6
