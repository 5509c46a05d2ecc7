"""Triton backend of the fused losses (drift_engine.kernels) against the float64 reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), in fp32 and fp16;
bf16 and the 64-bit-offset test need CUDA. Each error is bounded by PyTorch's own error on
the same inputs in the same dtype (dense logits, fp32 softmax) plus a small margin; both the
truth and PyTorch's result come from drift_engine.ops.reference. The launchers take plain
numbers; the cases keep them as keyword dicts.
"""

from __future__ import annotations

import pytest
import torch

from drift_engine.kernels import _chunking
from drift_engine.kernels.cross_entropy import ce_forward, resolve_schedule
from drift_engine.kernels.logprobs import logprobs_backward, logprobs_forward
from drift_engine.ops import CrossEntropyOptions, LogProbOptions
from drift_engine.ops.backends import launcher_options
from drift_engine.ops.reference import cross_entropy_reference, logprobs_reference, reference_logits

IGNORE = -100
# Margin on top of 2x PyTorch's own relative error, per dtype.
MARGIN = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# ----------------------------------------------------------------------------- helpers


def _make_inputs(n, h, v, dtype, device, *, bias=False, ignored_frac=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) / h**0.25
    weight = torch.randn(v, h, generator=gen) / h**0.25
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored_frac] = IGNORE
    coef = torch.rand(n, generator=gen) + 0.1  # non-uniform importance weights
    to = dict(device=device)
    return (
        hidden.to(dtype=dtype, **to),
        weight.to(dtype=dtype, **to),
        b.to(dtype=dtype, **to) if b is not None else None,
        labels.to(**to),
        coef.to(**to),
    )


def _leaves(logits_dtype, *tensors):
    """Fresh leaves: float64 for the truth (so its gradients are not rounded), else as given."""
    cast = (lambda t: t.double()) if logits_dtype is None else (lambda t: t)
    return [cast(t).detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _grads(objective, leaves):
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(objective, present))
    return [next(grads) if t is not None else None for t in leaves]


# The launchers' loss options that the reference knows (chunk_size and schedule are not).
_LOSS_KEYS = ("label_smoothing", "z_loss", "softcap")


def _ce_dense(hidden, weight, bias, labels, coef, options, logits_dtype):
    """(loss per row, lse, grads of Σ coef·loss) from the dense reference: float64 with
    ``logits_dtype=None`` (the truth), PyTorch's own path with ``logits_dtype=float32``."""
    loss_options = {k: options[k] for k in _LOSS_KEYS if k in options}
    leaves = _leaves(logits_dtype, hidden, weight, bias)
    h, w, b = leaves
    common = dict(bias=b, ignore_index=IGNORE, logits_dtype=logits_dtype, **loss_options)
    loss = cross_entropy_reference(h, w, labels, reduction="none", **common)
    total = cross_entropy_reference(h, w, labels, token_weights=coef, reduction="sum", **common)
    softcap = loss_options.get("softcap")
    lse = torch.logsumexp(
        reference_logits(h, w, b, softcap=softcap, logits_dtype=logits_dtype), dim=-1
    )
    return (loss.detach(), lse.detach(), *_grads(total, leaves))


def _logprobs_dense(hidden, weight, bias, labels, grad_lp, grad_ent, temperature, logits_dtype):
    """(logprobs, entropy, lse, grads of Σ grad_lp·logprobs + Σ grad_ent·entropy) from the
    dense reference (float64 or PyTorch's own path, as in _ce_dense)."""
    leaves = _leaves(logits_dtype, hidden, weight, bias)
    h, w, b = leaves
    out = logprobs_reference(
        h, w, labels, temperature=temperature, bias=b, logits_dtype=logits_dtype
    )
    lse = torch.logsumexp(reference_logits(h, w, b, logits_dtype=logits_dtype) / temperature, -1)
    total = 0.0
    if grad_lp is not None:
        total = total + (out.logprobs * grad_lp.to(out.logprobs.dtype)).sum()
    if grad_ent is not None:
        total = total + (out.entropy * grad_ent.to(out.entropy.dtype)).sum()
    return (out.logprobs.detach(), out.entropy.detach(), lse.detach(), *_grads(total, leaves))


def _rel_err(actual, truth):
    return (
        (actual.double() - truth.double()).abs().max() / truth.double().abs().max().clamp_min(1e-30)
    ).item()


def _check_close(name, actual, truth, same_dtype, dtype):
    """actual's error vs truth ≤ 2 x PyTorch's same-dtype error + margin (relative to max|truth|)."""
    assert actual.shape == truth.shape, name
    assert torch.isfinite(actual).all(), name
    if truth.abs().max() == 0:
        assert actual.abs().max() == 0, f"{name}: expected exact zeros"
        return
    err = _rel_err(actual, truth)
    bound = 2 * _rel_err(same_dtype, truth) + MARGIN[dtype]
    assert err <= bound, f"{name}: rel. error {err:.3e} > bound {bound:.3e}"


def _run_ce_case(n, h, v, dtype, device, options, *, bias=False, ignored_frac=0.2, seed=0):
    hidden, weight, b, labels, coef = _make_inputs(
        n, h, v, dtype, device, bias=bias, ignored_frac=ignored_frac, seed=seed
    )
    out = ce_forward(hidden, weight, b, labels, coef, ignore_index=IGNORE, **options)
    truth = _ce_dense(hidden, weight, b, labels, coef, options, None)
    same = _ce_dense(hidden, weight, b, labels, coef, options, torch.float32)
    names = ["loss", "lse", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, t, s in zip(names, out, truth, same, strict=True):
        if t is None:
            assert a is None, name
            continue
        if name.startswith("grad"):
            ref_dtype = {"grad_hidden": hidden, "grad_weight": weight, "grad_bias": b}[name].dtype
            assert a.dtype == ref_dtype, name
        else:
            assert a.dtype == torch.float32, name
        if name == "lse":  # ignored rows' lse is unspecified by the contract
            keep = labels != IGNORE
            a, t, s = a[keep], t[keep], s[keep]
            if keep.sum() == 0:
                continue
        _check_close(name, a, t, s, dtype)
    return out


# ----------------------------------------------------------------------------- cross-entropy

CE_CASES = {
    # name: (N, H, V, options, bias)
    "plain-V-prime": (37, 24, 101, {}, False),
    "all-options": (
        29,
        20,
        67,
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
        True,
    ),
    "multi-chunk": (45, 16, 61, dict(chunk_size=16, z_loss=1e-2), True),
    "slabs": (
        33,
        20,
        131,
        dict(schedule="vocab_slabs", label_smoothing=0.2, softcap=3.0),
        True,
    ),
    "slabs-multi-chunk": (
        26,
        12,
        97,
        dict(schedule="vocab_slabs", chunk_size=8, z_loss=1e-3),
        False,
    ),
    "single-row": (1, 23, 53, dict(label_smoothing=0.05), True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_ce_matches_reference(case, dtype, device):
    n, h, v, options, bias = CE_CASES[case]
    # A single row must not be ignored, or the case tests nothing.
    _run_ce_case(n, h, v, dtype, device, options, bias=bias, ignored_frac=0.0 if n == 1 else 0.2)


@pytest.mark.parametrize("schedule", ["token_chunks", "vocab_slabs"])
def test_ce_all_ignored_gives_zeros(schedule, device):
    options = dict(schedule=schedule, label_smoothing=0.1, z_loss=1e-2)
    hidden, weight, b, labels, coef = _make_inputs(9, 8, 19, torch.float32, device, bias=True)
    labels.fill_(IGNORE)
    loss, lse, gh, gw, gb = ce_forward(hidden, weight, b, labels, coef, **options)
    assert torch.isfinite(lse).all()
    for t in (loss, gh, gw, gb):
        assert torch.count_nonzero(t) == 0


def test_ce_forward_only_has_no_gradients(device):
    options = dict(label_smoothing=0.1, softcap=5.0, chunk_size=7)
    hidden, weight, b, labels, coef = _make_inputs(20, 16, 41, torch.float32, device, bias=True)
    loss, lse, gh, gw, gb = ce_forward(hidden, weight, b, labels, **options)
    assert gh is None and gw is None and gb is None
    truth = _ce_dense(hidden, weight, b, labels, coef, options, None)
    torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-5)


def test_ce_row_coef_scales_each_row(device):
    """Zero coefficients on half the rows: the gradients are those of the other half."""
    hidden, weight, _, labels, coef = _make_inputs(
        24, 16, 37, torch.float32, device, ignored_frac=0.0
    )
    coef[::2] = 0.0
    _, _, gh, gw, _ = ce_forward(hidden, weight, None, labels, coef, z_loss=1e-3)
    keep = coef != 0
    _, _, gh_half, gw_half, _ = ce_forward(
        hidden[keep], weight, None, labels[keep], coef[keep], z_loss=1e-3
    )
    assert torch.count_nonzero(gh[~keep]) == 0
    torch.testing.assert_close(gh[keep], gh_half, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_half, rtol=1e-5, atol=1e-6)


def test_ce_schedules_agree(device):
    hidden, weight, b, labels, coef = _make_inputs(30, 16, 83, torch.float32, device, bias=True)
    base = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, chunk_size=11)
    fast = ce_forward(hidden, weight, b, labels, coef, **base)
    lean = ce_forward(hidden, weight, b, labels, coef, schedule="vocab_slabs", **base)
    for a, c in zip(fast, lean, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_resolve_schedule():
    assert resolve_schedule("auto", with_grad=True) == "token_chunks"
    assert resolve_schedule("vocab_slabs", with_grad=True) == "vocab_slabs"
    assert resolve_schedule("vocab_slabs", with_grad=False) == "token_chunks"


# ----------------------------------------------------------------------------- log-probs

LOGPROB_CASES = {
    # name: (N, H, V, temperature, entropy, upstream grads on (logprobs, entropy), chunk, bias)
    "both-grads-temp": (31, 20, 89, 0.7, True, (True, True), None, True),
    "multi-chunk": (40, 16, 73, 1.3, True, (True, True), 12, False),
    "logprob-only": (25, 12, 59, 1.0, False, (True, False), 9, True),
    "entropy-only": (1, 23, 47, 1.0, True, (False, True), None, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(LOGPROB_CASES))
def test_logprobs_match_reference(case, dtype, device):
    n, h, v, temperature, entropy, (with_glp, with_gent), chunk, bias = LOGPROB_CASES[case]
    _run_logprobs_case(
        n, h, v, dtype, device, temperature, entropy, with_glp, with_gent, chunk, bias
    )


def _run_logprobs_case(
    n, h, v, dtype, device, temperature, entropy, with_glp, with_gent, chunk, bias
):
    hidden, weight, b, labels, _ = _make_inputs(
        n, h, v, dtype, device, bias=bias, ignored_frac=0.0 if n == 1 else 0.2
    )
    gen = torch.Generator().manual_seed(1)
    grad_lp = torch.randn(n, generator=gen).to(device) if with_glp else None
    grad_ent = torch.randn(n, generator=gen).to(device) if with_gent else None

    common = dict(temperature=temperature, ignore_index=IGNORE, chunk_size=chunk)
    logprobs, ent, lse = logprobs_forward(
        hidden, weight, b, labels, return_entropy=entropy, **common
    )
    grads = logprobs_backward(hidden, weight, b, labels, lse, grad_lp, grad_ent, **common)

    truth = _logprobs_dense(hidden, weight, b, labels, grad_lp, grad_ent, temperature, None)
    same = _logprobs_dense(hidden, weight, b, labels, grad_lp, grad_ent, temperature, torch.float32)
    assert logprobs.dtype == lse.dtype == torch.float32
    assert torch.count_nonzero(logprobs[labels == IGNORE]) == 0
    _check_close("logprobs", logprobs, truth[0], same[0], dtype)
    _check_close("lse", lse, truth[2], same[2], dtype)
    if entropy:
        _check_close("entropy", ent, truth[1], same[1], dtype)
    else:
        assert ent is None
    for name, a, t, s in zip(
        ["grad_hidden", "grad_weight", "grad_bias"], grads, truth[3:], same[3:], strict=True
    ):
        if t is None:
            assert a is None, name
            continue
        _check_close(name, a, t, s, dtype)


def test_logprobs_large_logits_over_several_blocks(device, monkeypatch):
    """Entropy and its gradient keep PyTorch's precision when the logits are large (an fp32
    lse far from 0 and Σ p·s of the logits' size) and a row spans several V blocks (the
    forward's online rescaling of the entropy sums, the max growing from block to block)."""
    monkeypatch.setattr(_chunking, "MAX_BLOCK_V", 16)
    n, h, v = 9, 16, 101
    hidden, weight, _, labels, _ = _make_inputs(n, h, v, torch.float32, device)
    b = 40.0 + torch.linspace(0.0, 3.0, v, device=device)  # (V,) large, rising along the row
    gen = torch.Generator().manual_seed(2)
    grad_lp = torch.randn(n, generator=gen).to(device)
    grad_ent = torch.randn(n, generator=gen).to(device)

    logprobs, ent, lse = logprobs_forward(
        hidden, weight, b, labels, temperature=0.8, return_entropy=True
    )
    grads = logprobs_backward(hidden, weight, b, labels, lse, grad_lp, grad_ent, temperature=0.8)

    truth = _logprobs_dense(hidden, weight, b, labels, grad_lp, grad_ent, 0.8, None)
    same = _logprobs_dense(hidden, weight, b, labels, grad_lp, grad_ent, 0.8, torch.float32)
    for name, actual, t, s in zip(
        ["logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias"],
        [logprobs, ent, lse, *grads],
        truth,
        same,
        strict=True,
    ):
        _check_close(name, actual, t, s, torch.float32)


def test_logprobs_backward_without_upstream_is_zero(device):
    hidden, weight, b, labels, _ = _make_inputs(5, 8, 13, torch.float32, device, bias=True)
    _, _, lse = logprobs_forward(hidden, weight, b, labels)
    for g in logprobs_backward(hidden, weight, b, labels, lse, None, None):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize(
    "launcher, options",
    [
        (ce_forward, CrossEntropyOptions(z_loss=1e-3, softcap=5.0, schedule="vocab_slabs")),
        (logprobs_forward, LogProbOptions(temperature=0.7, return_entropy=True, chunk_size=3)),
        (logprobs_backward, LogProbOptions(temperature=0.7, ignore_index=-1)),
    ],
)
def test_launchers_read_options_fields_by_name(launcher, options):
    """Each launcher's keyword arguments are options fields, handed over by name."""
    taken = launcher_options(launcher, options)
    assert taken and all(getattr(options, name) == value for name, value in taken.items())
    assert "impl" not in taken and "check_labels" not in taken


# ----------------------------------------------------------------------------- chunking


def test_rows_per_chunk_respects_budget_and_covers():
    for num_rows, row_bytes, budget in [
        (1000, 10, 2500),
        (8192, 256512, 2**31),
        (7, 3, 1),
        (16384, 303872, 2**31),
        (5, 100, 10**9),
    ]:
        rows = _chunking.rows_per_chunk(num_rows, row_bytes, budget)
        assert 1 <= rows <= num_rows
        assert rows * row_bytes <= budget or rows == 1
        bounds = _chunking.chunk_bounds(num_rows, rows)
        assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    # One chunk when everything fits; equal chunks otherwise (8192 x 128256 bf16 fits 2 GiB).
    assert _chunking.rows_per_chunk(8192, 128256 * 2, 2 * 1024**3) == 8192
    assert _chunking.rows_per_chunk(1000, 10, 2500) == 250  # 4 chunks of 250 rows
    assert _chunking.rows_per_chunk(1000, 10, 3000) == 256  # 4 chunks, rounded to 64 rows


def test_columns_per_slab_respects_budget():
    cols = _chunking.columns_per_slab(128256, 8192 * 2, 128 * 1024**2)
    assert cols % _chunking.COLUMN_MULTIPLE == 0 and cols * 8192 * 2 <= 128 * 1024**2
    assert _chunking.columns_per_slab(100, 4, 10**6) == 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_accumulate_keeps_fp32(dtype, device):
    gen = torch.Generator().manual_seed(0)
    chunks = [
        (torch.randn(9, 16, generator=gen), torch.randn(16, 7, generator=gen)) for _ in range(4)
    ]
    chunks = [
        (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)) for a, b in chunks
    ]
    acc = _chunking.matmul_fp32(*chunks[0])
    for a, b in chunks[1:]:
        _chunking.matmul_accumulate(acc, a, b)
    assert acc.dtype == torch.float32
    truth = sum(a.double() @ b.double() for a, b in chunks)
    # Each product is rounded at most once to `dtype`; the running sum stays fp32.
    unit = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert _rel_err(acc, truth) <= 2 * unit


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CE_CASES))
def test_ce_bf16_matches_reference_gpu(case):
    n, h, v, options, bias = CE_CASES[case]
    _run_ce_case(
        n * 8,
        h * 8,
        v * 40 + 3,
        torch.bfloat16,
        torch.device("cuda"),
        options,
        bias=bias,
        ignored_frac=0.2,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LOGPROB_CASES))
def test_logprobs_bf16_matches_reference_gpu(case):
    n, h, v, temperature, entropy, (glp, gent), chunk, bias = LOGPROB_CASES[case]
    _run_logprobs_case(
        n * 8,
        h * 8,
        v * 40 + 3,
        torch.bfloat16,
        torch.device("cuda"),
        temperature,
        entropy,
        glp,
        gent,
        chunk and chunk * 8,
        bias,
    )


@pytest.mark.gpu
def test_offsets_beyond_int32_gpu():
    """One chunk of N x V > 2^31 logits: rows past element 2^31 must be right."""
    device = torch.device("cuda")
    n, h, v = 17000, 64, 128257  # n·v ≈ 2.18e9 > 2^31
    hidden, weight, _, labels, coef = _make_inputs(
        n, h, v, torch.bfloat16, device, ignored_frac=0.0
    )
    tail = slice(n - 4, n)  # rows whose logits start beyond element 2^31
    coef.zero_()
    coef[tail] = 1.0
    options = dict(chunk_size=n, z_loss=1e-3)
    loss, lse, gh, gw, _ = ce_forward(hidden, weight, None, labels, coef, **options)
    rows = (hidden[tail], weight, None, labels[tail], coef[tail], options)
    truth = _ce_dense(*rows, None)
    same = _ce_dense(*rows, torch.float32)
    _check_close("loss", loss[tail], truth[0], same[0], torch.bfloat16)
    _check_close("lse", lse[tail], truth[1], same[1], torch.bfloat16)
    _check_close("grad_hidden", gh[tail], truth[2], same[2], torch.bfloat16)
    _check_close("grad_weight", gw, truth[3], same[3], torch.bfloat16)
    del gh, gw

    logprobs, ent, lp_lse = logprobs_forward(
        hidden, weight, None, labels, chunk_size=n, return_entropy=True
    )
    lp_rows = (hidden[tail], weight, None, labels[tail], None, torch.ones(4, device=device), 1.0)
    lp_truth = _logprobs_dense(*lp_rows, None)
    lp_same = _logprobs_dense(*lp_rows, torch.float32)
    _check_close("logprobs", logprobs[tail], lp_truth[0], lp_same[0], torch.bfloat16)
    _check_close("entropy", ent[tail], lp_truth[1], lp_same[1], torch.bfloat16)
