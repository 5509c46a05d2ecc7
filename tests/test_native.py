"""The native CPU cross-entropy (drift_engine/csrc, drift_engine/ops/native.py) against the
Python backend and the float64 reference.

scripts/setup.sh builds it; without a build these tests are skipped as "NATIVE NOT BUILT",
and under CI (``CI=true``) they fail instead. The rest of the suite runs whatever is built,
so with a build every fp32 CPU cross-entropy test of the suite runs the native code.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from factories import linear_loss_inputs as make_inputs

from drift_engine import fused_linear_cross_entropy
from drift_engine.ops import FusedOpError, native
from drift_engine.ops.reference import cross_entropy_reference

IGNORE = -100


@pytest.fixture(autouse=True)
def built():
    if not native.available():
        message = "NATIVE NOT BUILT: `drift-engine native build` (scripts/setup.sh runs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def run(hidden, weight, bias, labels, *, python=False, **options):
    """(loss, grad_hidden, grad_weight, grad_bias) of the fused op on fresh leaves; the
    upstream gradient of "none" is a fixed random vector."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)
    ]
    h, w, b = leaves
    with native.disabled() if python else contextlib.nullcontext():
        loss = fused_linear_cross_entropy(h, w, labels, bias=b, impl="torch", **options)
        upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
        (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def reference(hidden, weight, bias, labels, **options):
    leaves = [
        None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)
    ]
    h, w, b = leaves
    weights = options.pop("token_weights", None)
    options.pop("chunk_size", None)
    loss = cross_entropy_reference(
        h, w, labels, bias=b, token_weights=None if weights is None else weights.double(), **options
    )
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).double()
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="mean", z_loss=1e-3, bias=True),
    dict(reduction="mean", label_smoothing=0.2, z_loss=1e-2, chunk_size=7, weights=False),
    dict(reduction="none", bias=True),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, chunk_size=5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_python_backend_and_float64(case):
    case = dict(case)
    bias = case.pop("bias", False)
    hidden, weight, bias_t, labels, token_weights = make_inputs(70, 16, 89, bias=bias)
    if case.pop("weights", True):
        case["token_weights"] = token_weights
    got = run(hidden, weight, bias_t, labels, **case)
    python = run(hidden, weight, bias_t, labels, python=True, **case)
    truth = reference(hidden, weight, bias_t, labels, **case)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    for name, g, p, t in zip(names, got, python, truth, strict=True):
        if t is None:
            assert g is None and p is None
            continue
        scale = t.abs().max().item()
        # as exact as the Python backend: both within a few fp32 ulps of the float64 truth
        assert (g.double() - t).abs().max().item() <= 4e-6 * scale, name
        torch.testing.assert_close(g, p, rtol=2e-5, atol=2e-6 * scale, msg=name)


def test_large_and_spread_logits_stay_exact():
    """Row maxima of hundreds and logits spanning past exp's fp32 range (the polynomial's
    clamp at -87): losses and gradients as exact as float64 allows in fp32."""
    hidden, weight, _, labels, token_weights = make_inputs(64, 16, 300, scale=40.0, ignored=0.0)
    bias = torch.linspace(-200.0, 300.0, 300)
    got = run(hidden, weight, bias, labels, token_weights=token_weights)
    truth = reference(hidden, weight, bias, labels, token_weights=token_weights)
    for g, t in zip(got, truth, strict=True):
        assert (g.double() - t).abs().max().item() <= 2e-6 * max(t.abs().max().item(), 1.0)


def test_evaluation_without_gradients_is_the_same_loss():
    hidden, weight, _, labels, token_weights = make_inputs(40, 16, 61)
    h = hidden.clone().requires_grad_()
    trained = fused_linear_cross_entropy(h, weight, labels, token_weights=token_weights)
    with torch.no_grad():
        evaluated = fused_linear_cross_entropy(h, weight, labels, token_weights=token_weights)
    with torch.inference_mode():
        inferred = fused_linear_cross_entropy(h, weight, labels, token_weights=token_weights)
    assert trained.requires_grad and not evaluated.requires_grad and not inferred.requires_grad
    assert trained.item() == evaluated.item() == inferred.item()


def test_frozen_head_gets_no_gradient():
    """LoRA-style: the LM head frozen, only the hidden states' gradient (equal to the one
    computed with the head trainable)."""
    hidden, weight, _, labels, token_weights = make_inputs(40, 16, 61)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, labels, token_weights=token_weights).backward()
    assert weight.grad is None
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_linear_cross_entropy(h2, w2, labels, token_weights=token_weights).backward()
    assert w2.grad is not None
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=0)


def test_all_ignored_and_empty_batches():
    hidden, weight, _, labels, token_weights = make_inputs(12, 8, 33)
    loss, grad_hidden, grad_weight, _ = run(
        hidden, weight, None, torch.full_like(labels, IGNORE), token_weights=token_weights
    )
    assert loss.item() == 0.0 and not grad_hidden.any() and not grad_weight.any()
    loss, grad_hidden, grad_weight, _ = run(hidden[:0], weight, None, labels[:0])
    assert loss.item() == 0.0 and grad_hidden.shape == (0, 8) and not grad_weight.any()


def test_labels_out_of_range():
    hidden, weight, _, labels, _ = make_inputs(12, 8, 33)
    labels[3] = 33
    with pytest.raises(FusedOpError, match=r"labels\[3\] = 33 is outside \[0, 33\)"):
        fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    # unchecked, the native loop still refuses to read outside the row
    with pytest.raises(ValueError, match=r"labels\[3\] = 33 is outside \[0, 33\)"):
        fused_linear_cross_entropy(hidden, weight, labels, check_labels=False)


def test_serves_only_fp32_cpu_without_softcap():
    hidden, weight, _, labels, _ = make_inputs(4, 8, 16)
    assert native.serves(hidden, weight, None, None)
    assert not native.serves(hidden, weight, None, 30.0)
    assert not native.serves(hidden.bfloat16(), weight.bfloat16(), None, None)
    assert not native.serves(hidden, weight, torch.zeros(16, dtype=torch.float64), None)
    with native.disabled():
        assert not native.serves(hidden, weight, None, None)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "drift_engine", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_status_and_build_errors(tmp_path):
    done = _cli("native", "status")
    assert done.returncode == 0 and done.stdout.startswith("loaded "), done.stdout
    done = _cli("native", "status", env={native.NATIVE_ENV: "0"})
    assert done.returncode == 0 and done.stdout.startswith("off"), done.stdout
    done = _cli("native", "status", env={"DRIFT_ENGINE_CACHE": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.startswith("not built"), done.stdout
    # a missing compiler: one error line, exit 2, nothing left in the cache
    done = _cli("native", "build", env={"DRIFT_ENGINE_CACHE": str(tmp_path), "CXX": "no-such-c++"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: no C++ compiler 'no-such-c++'"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.so*"))


def test_many_parallel_tasks_and_chunks():
    """Rows split over threads (V=4096: 8 rows per task) and uneven chunks; an out-of-range
    label found by a worker thread comes back as the error."""
    hidden, weight, bias, labels, token_weights = make_inputs(256, 16, 4096, bias=True)
    options = dict(token_weights=token_weights, label_smoothing=0.1, z_loss=1e-3, chunk_size=37)
    got = run(hidden, weight, bias, labels, **options)
    python = run(hidden, weight, bias, labels, python=True, **options)
    for g, p in zip(got, python, strict=True):
        torch.testing.assert_close(g, p, rtol=2e-5, atol=1e-7)
    labels[200] = -5
    with pytest.raises(ValueError, match=r"labels\[200\] = -5 is outside"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=bias, check_labels=False)


def test_masked_logits_get_exactly_zero_gradient():
    """A -inf bias (a masked vocabulary entry) and logits far below the row's maximum
    contribute exactly 0, as in the Python backend."""
    hidden, weight, _, labels, token_weights = make_inputs(30, 8, 50, ignored=0.0)
    labels = labels % 40
    bias = torch.zeros(50)
    bias[40:45] = -torch.inf
    bias[45:] = -200.0
    loss, _, grad_weight, grad_bias = run(hidden, weight, bias, labels, token_weights=token_weights)
    assert torch.isfinite(loss).all()
    assert (grad_bias[40:] == 0).all() and (grad_weight[40:] == 0).all()


def test_a_build_that_does_not_load_falls_back(tmp_path):
    env = {"DRIFT_ENGINE_CACHE": str(tmp_path)}
    where = "from drift_engine.ops import native; print(native.library_file())"
    path = subprocess.run(
        [sys.executable, "-c", where], capture_output=True, text=True, env={**os.environ, **env}
    ).stdout.strip()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a shared library")
    done = _cli("native", "status", env=env)
    assert done.returncode == 0 and done.stdout.startswith("built but not loaded"), done.stdout
    assert "did not load" in done.stderr
    code = (
        "import torch; from drift_engine import fused_linear_cross_entropy as f; "
        "print(f(torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4])).item())"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert done.returncode == 0 and float(done.stdout) > 0, done.stderr


def test_weight_check_without_a_host_synchronisation():
    """check_labels=True on the native path: the op reads the weights and labels itself and
    the errors are the Python path's FusedOpError; unchecked, a negative weight is a
    coefficient like any other, as in the Python path."""
    hidden, weight, _, labels, token_weights = make_inputs(20, 8, 33)
    token_weights[5] = -1.0
    with pytest.raises(FusedOpError, match=r"token_weights\[5\] = -1.0 is negative or not finite"):
        fused_linear_cross_entropy(hidden, weight, labels, token_weights=token_weights)
    token_weights[5] = float("nan")
    with pytest.raises(FusedOpError, match=r"token_weights\[5\] = nan"):
        fused_linear_cross_entropy(hidden, weight, labels, token_weights=token_weights)
    wide = token_weights.double()
    wide[5] = 1e39  # finite in float64, inf as the fp32 weight both paths use
    with pytest.raises(FusedOpError, match=r"token_weights\[5\] = inf"):
        fused_linear_cross_entropy(hidden, weight, labels, token_weights=wide)
    with native.disabled(), pytest.raises(FusedOpError, match=r"token_weights\[5\] = inf"):
        fused_linear_cross_entropy(hidden, weight, labels, token_weights=wide)
    token_weights[5] = -1.0
    unchecked = dict(token_weights=token_weights, check_labels=False, reduction="sum")
    got = run(hidden, weight, None, labels, **unchecked)
    python = run(hidden, weight, None, labels, python=True, **unchecked)
    for g, p in zip(got, python, strict=True):
        torch.testing.assert_close(g, p, rtol=2e-5, atol=1e-6)


def test_direct_op_calls_check_their_inputs():
    """The ops are public in torch.ops: wrong shapes are errors, not reads out of bounds."""
    hidden, weight, _, labels, _ = make_inputs(6, 8, 10)
    op = torch.ops.drift_engine_native.ce_forward
    with pytest.raises(ValueError, match="V > 0"):
        op(hidden, weight[:0], None, labels, None, IGNORE, 6, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        op(hidden, weight, None, labels[:3], None, IGNORE, 6, 0.0, 0.0)
    with pytest.raises(ValueError, match="bias must be"):
        op(hidden, weight, torch.zeros(9), labels, None, IGNORE, 6, 0.0, 0.0)
