"""The fused ops under torch.compile(fullgraph=True), through the drift_engine custom ops.

Each compiled function is checked three ways: it compiles as one graph (fullgraph), the
graph calls the expected ``torch.ops.drift_engine`` op (the one path that eager runs too),
and its value and gradients equal eager's. Shapes are small and
the backend is mostly ``aot_eager`` (no code generation), so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from kernel_utils import requires_kernels
from torch._dynamo.testing import CompileCounterWithBackend

from drift_engine import FusedLinearCrossEntropy, fused_linear_cross_entropy, fused_linear_logprobs
from drift_engine.ops import CrossEntropyOptions, FusedOpError, LogProbOptions
from drift_engine.ops.library import option_values

NUM_TOKENS, HIDDEN, VOCAB = 37, 24, 101
IGNORE = -100
OPS = torch.ops.drift_engine


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs(num_tokens=NUM_TOKENS, *, seed=0, device="cpu"):
    """hidden (N, H), weight (V, H), bias (V,), labels (N,) with ignored rows, token
    weights (N,) non-uniform."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen) / HIDDEN**0.25
    weight = 2 * torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.25
    bias = torch.randn(VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (num_tokens,), generator=gen)
    labels[torch.rand(num_tokens, generator=gen) < 0.2] = IGNORE
    token_weights = torch.rand(num_tokens, generator=gen) * 2 + 0.05
    return tuple(t.to(device) for t in (hidden, weight, bias, labels, token_weights))


def op_nodes(graphs) -> list:
    """The calls of drift_engine ops in the captured Dynamo graphs, including those inside
    the traced autograd Functions' forward subgraphs."""
    return [
        node
        for graph in graphs
        for module in graph.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("drift_engine.")
    ]


def overload(node) -> torch._ops.OpOverload:
    """The op overload a node calls (subgraphs may call the op packet)."""
    target = node.target
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def ops_called(graphs) -> set[str]:
    """Names of the drift_engine ops that the captured Dynamo graphs call."""
    return {overload(node).name() for node in op_nodes(graphs)}


def outputs_and_grads(fn, inputs, upstreams):
    """fn(hidden, weight, bias, labels, token_weights) -> tuple of outputs; returns the
    outputs and the gradients of Σ upstream·output w.r.t. hidden, weight, bias."""
    hidden, weight, bias, labels, token_weights = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    outputs = fn(*leaves, labels, token_weights)
    grads = torch.autograd.grad(outputs, leaves, upstreams)
    return outputs, grads


def assert_same(actual, expected, what):
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=f"{what}[{index}]")


def compare_with_eager(fn, upstreams, expected_op, *, backend="aot_eager", inputs=None):
    inputs = make_inputs() if inputs is None else inputs
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    outputs, grads = outputs_and_grads(compiled, inputs, upstreams)
    expected_outputs, expected_grads = outputs_and_grads(fn, inputs, upstreams)
    assert expected_op in ops_called(counter.graphs)
    assert_same(outputs, expected_outputs, "output")
    assert_same(grads, expected_grads, "grad (hidden, weight, bias)")


def scalar(loss):
    return (loss,)


CE_VARIANTS = {
    "mean_weighted_bias": (
        lambda h, w, b, y, tw: scalar(
            fused_linear_cross_entropy(h, w, y, token_weights=tw, bias=b, impl="torch")
        ),
        "drift_engine::ce_forward",
    ),
    "sum_module": (
        lambda h, w, b, y, tw: scalar(
            FusedLinearCrossEntropy(reduction="sum", impl="torch", chunk_size=16)(
                h, w, y, token_weights=tw, bias=b
            )
        ),
        "drift_engine::ce_forward",
    ),
    "smoothing_zloss_softcap": (
        lambda h, w, b, y, tw: scalar(
            fused_linear_cross_entropy(
                h,
                w,
                y,
                token_weights=tw,
                bias=b,
                label_smoothing=0.1,
                z_loss=1e-3,
                softcap=4.0,
                impl="torch",
                chunk_size=16,
            )
        ),
        "drift_engine::ce_forward",
    ),
    "none": (
        lambda h, w, b, y, tw: scalar(
            fused_linear_cross_entropy(
                h, w, y, token_weights=tw, bias=b, reduction="none", softcap=4.0, impl="torch"
            )
        ),
        "drift_engine::ce_forward",
    ),
}


@pytest.mark.parametrize("variant", list(CE_VARIANTS))
def test_cross_entropy_matches_eager(variant):
    fn, expected_op = CE_VARIANTS[variant]
    gen = torch.Generator().manual_seed(1)
    if variant == "none":
        # Non-uniform, sign-changing: a uniform upstream gradient hides row-scaling bugs.
        upstream = torch.randn(NUM_TOKENS, generator=gen)
    else:
        upstream = torch.tensor(0.37)  # != 1: backward must scale the saved gradients
    compare_with_eager(fn, (upstream,), expected_op)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_eager(temperature):
    def fn(hidden, weight, bias, labels, token_weights):
        out = fused_linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            return_entropy=True,
            impl="torch",
            chunk_size=16,
        )
        return out.logprobs, out.entropy

    gen = torch.Generator().manual_seed(2)
    upstreams = (torch.randn(NUM_TOKENS, generator=gen), torch.randn(NUM_TOKENS, generator=gen))
    compare_with_eager(fn, upstreams, "drift_engine::logprobs_forward")


def test_logprobs_without_entropy_match_eager():
    def fn(hidden, weight, bias, labels, token_weights):
        out = fused_linear_logprobs(hidden, weight, labels, bias=bias, impl="torch")
        assert out.entropy is None
        return ((out.logprobs * token_weights).sum(),)

    compare_with_eager(fn, (torch.tensor(1.3),), "drift_engine::logprobs_forward")


def test_evaluation_without_grad_skips_the_gradient_op():
    hidden, weight, bias, labels, token_weights = make_inputs()

    def fn(hidden, weight, labels, token_weights):
        return fused_linear_cross_entropy(
            hidden, weight, labels, token_weights=token_weights, impl="torch"
        )

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        actual = compiled(hidden.requires_grad_(), weight, labels, token_weights)
        expected = fn(hidden, weight, labels, token_weights)
    assert ops_called(counter.graphs) == {"drift_engine::ce_forward"}
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    assert not actual.requires_grad


def _inductor_compiles() -> bool:
    try:
        torch.compile(lambda x: x * 2 + 1, backend="inductor", fullgraph=True)(torch.ones(3))
    except Exception:  # no C++ compiler, or inductor unavailable on this platform
        return False
    return True


def test_inductor_matches_eager():
    if not _inductor_compiles():
        pytest.skip("torch.compile's inductor backend cannot compile on this machine")
    fn, expected_op = CE_VARIANTS["mean_weighted_bias"]
    compare_with_eager(fn, (torch.tensor(0.37),), expected_op, backend="inductor")


def test_dynamic_number_of_tokens_does_not_recompile():
    def fn(hidden, weight, bias, labels, token_weights, temperature, z_loss):
        # Options passed as arguments are symbolic floats in a dynamic trace.
        loss = fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weights=token_weights,
            bias=bias,
            z_loss=z_loss,
            impl="torch",
        )
        out = fused_linear_logprobs(
            hidden, weight, labels, temperature=temperature, return_entropy=True, impl="torch"
        )
        return (loss + out.logprobs.sum() - 0.1 * out.entropy.sum(),)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    # A second compile for the new N would raise RecompileError.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for num_tokens in (NUM_TOKENS, 50):
            inputs = make_inputs(num_tokens, seed=num_tokens)
            value, grads = outputs_and_grads(lambda *a: compiled(*a, 0.7, 1e-3), inputs, None)
            expected, expected_grads = outputs_and_grads(lambda *a: fn(*a, 0.7, 1e-3), inputs, None)
            assert_same(value, expected, f"value at N={num_tokens}")
            assert_same(grads, expected_grads, f"grad at N={num_tokens}")
            frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]


# Each path reaches the ops differently: the scalar loss with gradients (ce_forward with
# row_coef), evaluation and "none" (ce_forward without), log-probs (logprobs_forward).
CHECKED_PATHS = {
    "mean_with_grad": dict(requires_grad=True, reduction="mean"),
    "mean_evaluation": dict(requires_grad=False, reduction="mean"),
    "none": dict(requires_grad=True, reduction="none"),
    "logprobs": dict(requires_grad=True, reduction=None),
}


@pytest.mark.parametrize("path", list(CHECKED_PATHS))
def test_label_and_weight_checks_run_when_the_graph_runs(path):
    requires_grad, reduction = CHECKED_PATHS[path].values()
    hidden, weight, _, labels, token_weights = make_inputs()
    hidden.requires_grad_(requires_grad)

    def fn(labels, token_weights, check_labels):
        if reduction is None:
            out = fused_linear_logprobs(hidden, weight, labels, check_labels=check_labels)
            return out.logprobs * token_weights
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weights=token_weights,
            reduction=reduction,
            check_labels=check_labels,
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    # Traced with valid inputs first: the checks must run on every call, not at trace time.
    torch.testing.assert_close(
        compiled(labels, token_weights, True), fn(labels, token_weights, True)
    )

    bad_labels = labels.clone()
    bad_labels[5] = VOCAB + 3
    with pytest.raises(FusedOpError, match=rf"labels\[5\] = {VOCAB + 3} is outside \[0, {VOCAB}\)"):
        compiled(bad_labels, token_weights, True)
    if reduction is not None:
        bad_weights = token_weights.clone()
        bad_weights[2] = -1.0
        with pytest.raises(FusedOpError, match=r"token_weights\[2\] = -1.0 is negative"):
            compiled(labels, bad_weights, True)
        # check_labels=False skips the check under compile too.
        assert torch.isfinite(compiled(labels, bad_weights, False)).all()


def test_shape_errors_raise_while_tracing():
    hidden, weight, _, labels, _ = make_inputs()
    message = "does not match hidden"
    compiled = torch.compile(fused_linear_cross_entropy, backend="aot_eager")
    with pytest.raises(FusedOpError, match=message):
        compiled(hidden, weight[:, :5], labels)
    # fullgraph=True: Dynamo reports an exception raised while tracing as its own error
    # type, with the FusedOpError's message in it.
    torch._dynamo.reset()
    compiled = torch.compile(fused_linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=message):
        compiled(hidden, weight[:, :5], labels)


@requires_kernels("cross_entropy")
def test_triton_impl_through_the_custom_op():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter

    def fn(hidden, weight, bias, labels, token_weights):
        loss = fused_linear_cross_entropy(
            hidden, weight, labels, token_weights=token_weights, bias=bias, impl="triton"
        )
        return (loss,)

    inputs = make_inputs(device=device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    upstream = (torch.tensor(0.37, device=device),)
    outputs, grads = outputs_and_grads(compiled, inputs, upstream)
    expected_outputs, expected_grads = outputs_and_grads(fn, inputs, upstream)
    (node,) = [n for n in op_nodes(counter.graphs) if overload(n) is OPS.ce_forward.default]
    assert "triton" in node.args
    assert_same(outputs, expected_outputs, "loss")
    assert_same(grads, expected_grads, "grad")


def _opcheck_cases():
    # The ops carry no autograd formula (the autograd Functions of drift_engine.ops.autograd
    # differentiate them), so they are checked on inputs that do not require grad.
    h, w, b, labels, token_weights = make_inputs()
    ce = option_values(
        CrossEntropyOptions(
            label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=16, impl="torch"
        )
    )
    ce_sum = option_values(CrossEntropyOptions(reduction="sum", impl="torch"))
    lp = option_values(
        LogProbOptions(temperature=0.7, return_entropy=True, chunk_size=16, impl="torch")
    )
    lp_plain = option_values(LogProbOptions(impl="torch"))
    grad_rows = torch.randn(NUM_TOKENS)
    row_coef = torch.rand(NUM_TOKENS)
    lse = torch.logsumexp((h @ w.T + b) / 0.7, dim=1)
    return {
        "ce_forward_with_grads": (
            OPS.ce_forward.default,
            (h, w, b, labels, token_weights, row_coef, *ce),
        ),
        "ce_forward_with_grads_no_bias": (
            OPS.ce_forward.default,
            (h, w, None, labels, None, row_coef, *ce_sum),
        ),
        "ce_forward_rows": (OPS.ce_forward.default, (h, w, b, labels, token_weights, None, *ce)),
        "logprobs_forward": (OPS.logprobs_forward.default, (h, w, b, labels, *lp)),
        "logprobs_forward_no_entropy": (
            OPS.logprobs_forward.default,
            (h, w, None, labels, *lp_plain),
        ),
        "logprobs_backward": (
            OPS.logprobs_backward.default,
            (h, w, b, labels, lse, grad_rows, None, *lp),
        ),
        "logprobs_backward_entropy_no_bias": (
            OPS.logprobs_backward.default,
            (h, w, None, labels, lse, None, grad_rows, *lp),
        ),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "op, options_type, num_tensors",
    [
        (OPS.ce_forward.default, CrossEntropyOptions, 6),
        (OPS.logprobs_forward.default, LogProbOptions, 4),
        (OPS.logprobs_backward.default, LogProbOptions, 7),
    ],
)
def test_op_schemas_are_the_options_fields(op, options_type, num_tensors):
    """The options travel through each op as its fields, in order: a field added to the
    dataclass reaches the op (and the backends) with no other edit."""
    arguments = op._schema.arguments
    assert all("Tensor" in str(a.type) for a in arguments[:num_tensors])
    assert not any("Tensor" in str(a.type) for a in arguments[num_tensors:])
    names = [a.name for a in arguments[num_tensors:]]
    assert names == [field.name for field in dataclasses.fields(options_type)]
    opts = options_type(chunk_size=7, impl="torch", check_labels=False)
    assert options_type(*option_values(opts)) == opts
