"""The autograd layer of the fused ops: one ``torch.autograd.Function`` per op, calling the
custom ops of library.py, in eager mode and under ``torch.compile`` alike (Dynamo traces
these Functions and keeps the ops opaque).

Cross-entropy with reduction "mean"/"sum" is a scalar whose per-row coefficients (the token
weights, normalised for "mean") are known in forward, so its gradient is computed in the
same pass (three GEMMs, no recompute) and backward only scales it by the upstream scalar.
With reduction "none" backward recomputes the logits chunk by chunk with each row's
upstream gradient as its coefficient. Log-probs keep each row's log-sum-exp and backward
recomputes the logits, honouring arbitrary upstream gradients on both outputs.

``linear_cross_entropy`` and ``linear_logprobs`` validate the inputs and apply the
Functions; the functional API and the nn modules call them with their options object.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from drift_engine.ops import backends, native, torch_impl, validation
from drift_engine.ops.library import option_values, plain_eager, run_op
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions


class LogProbs(NamedTuple):
    """Output of ``fused_linear_logprobs``: always this type, whatever was asked."""

    logprobs: torch.Tensor  # (N,) fp32, 0 for ignored rows
    entropy: torch.Tensor | None  # (N,) fp32, None unless return_entropy=True


def masked_token_weights(
    labels: torch.Tensor,  # (N,) int64
    token_weights: torch.Tensor | None,  # (N,)
    ignore_index: int,
) -> torch.Tensor:
    """(N,) fp32 token weights, 0 on ignored rows (1 elsewhere when none are given)."""
    if token_weights is None:
        return (labels != ignore_index).float()
    return token_weights.float().masked_fill(labels == ignore_index, 0.0)


def row_coefficients(
    labels: torch.Tensor,  # (N,) int64
    token_weights: torch.Tensor | None,  # (N,)
    opts: CrossEntropyOptions,
) -> torch.Tensor:
    """(N,) fp32 coefficient of each row's loss in the scalar loss: w ("sum") or w / Σw
    ("mean"), 0 on ignored rows."""
    weights = masked_token_weights(labels, token_weights, opts.ignore_index)
    if opts.reduction != "mean":
        return weights
    total = weights.sum()
    # An all-ignored batch has Σw = 0 and every coefficient 0: the loss and the gradients
    # are 0 rather than 0/0 (and no host sync is needed to tell).
    return weights / torch.where(total > 0, total, 1.0)


def _unchecked(opts: CrossEntropyOptions | LogProbOptions) -> tuple:
    """The op arguments of ``opts`` for a second call on inputs already checked."""
    return option_values(dataclasses.replace(opts, check_labels=False))


def _wanted(grads, needs) -> tuple:
    """The gradients some input asks for, None for the others (e.g. a frozen LM head's)."""
    return tuple(grad if needed else None for grad, needed in zip(grads, needs, strict=True))


class WeightedLinearCrossEntropy(torch.autograd.Function):
    """Scalar loss Σ_i c_i·loss_i with c = w ("sum") or w / Σw ("mean"); grads in forward.

    In eager mode the gradients are scaled in place by the first backward call, so one copy
    of each exists; backward can therefore run once per forward, and a second backward
    through the same graph (``retain_graph=True``) raises instead of returning stale
    gradients. A compiled graph may not overwrite its saved tensors: there backward scales
    out of place (docs/kernels.md has the memory accounting).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,) int64
        token_weights: torch.Tensor | None,  # (N,)
        opts: CrossEntropyOptions,
    ) -> torch.Tensor:
        row_coef = row_coefficients(labels, token_weights, opts)  # (N,) fp32
        loss, *grads = run_op(
            "ce_forward",
            hidden,
            weight,
            bias,
            labels,
            token_weights,
            row_coef,
            *option_values(opts),
        )
        # Held until backward: only those some input asks for.
        ctx.save_for_backward(*_wanted(grads, ctx.needs_input_grad[:3]))
        ctx.consumed = False
        return torch.dot(row_coef, loss)  # () fp32

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # grad_output: () fp32
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if ctx.consumed:
                raise validation.FusedOpError(
                    "backward ran twice through one fused_linear_cross_entropy(reduction="
                    "'mean' or 'sum') call; its gradients are computed in forward and handed "
                    "out once. Recompute the loss for each backward pass"
                )
            ctx.consumed = True
        grads = []
        for grad in ctx.saved_tensors:
            if grad is None:
                grads.append(None)
            elif compiling:
                grads.append(grad * grad_output)
            else:
                # In place: these buffers belong to this call alone. The fp32 scale is
                # applied in fp32 and rounded once to the gradient's dtype.
                grads.append(grad.mul_(grad_output))
        return (*grads, None, None, None)


class PerTokenLinearCrossEntropy(torch.autograd.Function):
    """Per-row w_i·loss_i (N,); backward recomputes with coefficients grad_out_i·w_i."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,) int64
        token_weights: torch.Tensor | None,  # (N,)
        opts: CrossEntropyOptions,
    ) -> torch.Tensor:
        weights = masked_token_weights(labels, token_weights, opts.ignore_index)  # (N,) fp32
        loss = run_op(
            "ce_forward", hidden, weight, bias, labels, token_weights, None, *option_values(opts)
        )[0]
        ctx.save_for_backward(hidden, weight, bias, labels, weights)
        ctx.options = _unchecked(opts)
        ctx.set_materialize_grads(False)
        return weights * loss  # (N,) fp32

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor | None):  # grad_output: (N,)
        needs = ctx.needs_input_grad[:3]
        if grad_output is None or not any(needs):
            return None, None, None, None, None, None
        hidden, weight, bias, labels, weights = ctx.saved_tensors
        row_coef = grad_output.float() * weights  # (N,) fp32
        _, *grads = run_op("ce_forward", hidden, weight, bias, labels, None, row_coef, *ctx.options)
        return (*_wanted(grads, needs), None, None, None)


class LinearLogProbs(torch.autograd.Function):
    """Outputs logprobs (N,), plus entropy (N,) when ``opts.return_entropy``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,) int64
        opts: LogProbOptions,
    ):
        logprobs, entropy, lse = run_op(
            "logprobs_forward", hidden, weight, bias, labels, *option_values(opts)
        )
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = _unchecked(opts)
        # Unused outputs arrive as None, so their (zero) contribution is skipped.
        ctx.set_materialize_grads(False)
        if opts.return_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        # grad_logprobs, grad_entropy: (N,) or None
        needs = ctx.needs_input_grad[:3]
        if (grad_logprobs is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = run_op(
            "logprobs_backward",
            hidden,
            weight,
            bias,
            labels,
            lse,
            grad_logprobs,
            grad_entropy,
            *ctx.options,
        )
        return (*_wanted(grads, needs), None, None)


def linear_cross_entropy(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,) integer
    opts: CrossEntropyOptions,
    *,
    token_weights: torch.Tensor | None = None,  # (N,)
    bias: torch.Tensor | None = None,  # (V,)
) -> torch.Tensor:
    """``fused_linear_cross_entropy`` with its options as one object."""
    validation.check_ce_options(opts)
    validation.check_linear_inputs(hidden, weight, bias, labels, token_weights)
    args = (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        labels.long().contiguous(),
        None if token_weights is None else token_weights.detach(),
        opts,
    )
    if opts.reduction == "none":
        return PerTokenLinearCrossEntropy.apply(*args)
    if _native_scalar_loss(args[0], args[1], args[2], opts):
        return _native_weighted_loss(*args)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if wants_grad:
        return WeightedLinearCrossEntropy.apply(*args)
    # Evaluation: one pass without the gradient GEMMs (no input needs autograd here).
    hidden, weight, bias, labels, token_weights, _ = args
    row_coef = row_coefficients(labels, token_weights, opts)  # (N,) fp32
    loss, *_ = run_op(
        "ce_forward", hidden, weight, bias, labels, token_weights, None, *option_values(opts)
    )
    return torch.dot(row_coef, loss)


def _native_scalar_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, opts
) -> bool:
    """Whether this scalar loss ("mean"/"sum", with or without gradients) is one native call:
    eager mode, plain tensors, the PyTorch backend, and what ``native.serves``."""
    return (
        plain_eager(hidden, weight, bias)
        and backends.resolve_impl(opts.impl, hidden.device) == "torch"
        and native.serves(hidden, weight, bias, opts.softcap)
    )


def _native_weighted_loss(
    hidden: torch.Tensor,  # (N, H) fp32 contiguous
    weight: torch.Tensor,  # (V, H) fp32 contiguous
    bias: torch.Tensor | None,  # (V,) fp32
    labels: torch.Tensor,  # (N,) int64 contiguous
    token_weights: torch.Tensor | None,  # (N,)
    opts: CrossEntropyOptions,
) -> torch.Tensor:
    """WeightedLinearCrossEntropy's loss and gradients as one native call, its autograd node
    in C++ (drift_engine/csrc/cross_entropy_cpu.cpp); without gradients, the loss alone."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    chunk = torch_impl.chunk_rows(num_tokens, vocab_size, opts.chunk_size, hidden.device)
    try:
        # check_labels costs no host synchronisation here: the op checks the labels in its
        # row pass (always) and the weights as it reads them (when asked)
        return torch.ops.drift_engine_native.weighted_cross_entropy(
            hidden,
            weight,
            bias,
            labels,
            token_weights,
            opts.reduction == "mean",
            opts.ignore_index,
            chunk,
            opts.label_smoothing,
            opts.z_loss,
            opts.check_labels,
        )
    except ValueError:
        if opts.check_labels:  # the same FusedOpError, with its advice, as the Python path
            try:
                validation.check_label_values(labels, vocab_size, opts.ignore_index, token_weights)
            except validation.FusedOpError as err:
                raise err from None
        raise


def linear_logprobs(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,) integer
    opts: LogProbOptions,
    *,
    bias: torch.Tensor | None = None,  # (V,)
) -> LogProbs:
    """``fused_linear_logprobs`` with its options as one object."""
    validation.check_logprob_options(opts)
    validation.check_linear_inputs(hidden, weight, bias, labels)
    outputs = LinearLogProbs.apply(
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        labels.long().contiguous(),
        opts,
    )
    if opts.return_entropy:
        return LogProbs(*outputs)
    return LogProbs(outputs, None)
