"""The fused ops as ``torch.library`` custom ops, the path ``torch.compile`` traces.

Eager calls go through the autograd Functions of cross_entropy.py and logprobs.py; while
``torch.compiler.is_compiling()`` the functional API calls ``linear_cross_entropy`` and
``linear_logprobs`` below instead. Each op is opaque to the compiler: its real
implementation resolves the backend, runs the label check (a host sync) and the chunk loop
or Triton launches at run time, and its fake implementation gives the output shapes from
the input shapes, so a new number of tokens N needs no recompile. Options travel as
primitive arguments; an absent tensor output (no bias, no entropy) is an empty tensor.

Ops in the ``drift_engine`` namespace:

    ce_loss_and_grads        "mean"/"sum": the scalar loss and its gradients, in one pass;
                             backward scales the gradients by the upstream scalar
    ce_row_losses            per-row losses (N,), forward only
    ce_row_losses_backward   gradients of Σ_i grad_i·loss_i (recomputes the logits)
    logprobs                 log-probs, entropies and log-sum-exps (N,) each
    logprobs_backward        gradients for upstream grads of log-probs and/or entropies

Unlike the eager Function, the backward of ``ce_loss_and_grads`` scales out of place (a
traced graph may not overwrite a saved tensor); docs/kernels.md has the memory accounting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drift_engine.ops import backends, validation
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions


def _ce_options(
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    schedule: str,
) -> CrossEntropyOptions:
    return CrossEntropyOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        schedule=schedule,
    )


def _ce_option_args(opts: CrossEntropyOptions) -> tuple:
    """The options after ``reduction`` in every cross-entropy op's signature."""
    return (
        opts.ignore_index,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.chunk_size,
        opts.schedule,
    )


def _absent(like: Tensor) -> Tensor:
    """The empty tensor that stands for a missing optional output."""
    return like.new_empty(0)


def _no_grads(count: int) -> tuple[None, ...]:
    return (None,) * count


# --- "mean" / "sum": gradients in forward ---------------------------------------------


@torch.library.custom_op("drift_engine::ce_loss_and_grads", mutates_args=())
def ce_loss_and_grads(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    token_weights: Tensor | None,  # (N,)
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    schedule: str,
    impl: str,
    check_labels: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Σ_i c_i·loss_i, c = w ("sum") or w / Σw ("mean"): (loss () fp32, grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,), or (0,) without bias)."""
    opts = _ce_options(
        reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, schedule
    )
    ce_forward = backends.ce_forward_of(validation.resolve_impl(impl, hidden.device))
    if check_labels:
        validation.check_label_values(labels, weight.shape[0], ignore_index, token_weights)
    row_coef = backends.row_coefficients(labels, token_weights, opts)  # (N,) fp32
    loss, _, grad_hidden, grad_weight, grad_bias = ce_forward(
        hidden, weight, bias, labels, opts, row_coef
    )
    if grad_bias is None:
        grad_bias = _absent(weight)
    return (row_coef * loss).sum(), grad_hidden, grad_weight, grad_bias


@ce_loss_and_grads.register_fake
def _(hidden, weight, bias, *_):
    grad_bias = _absent(weight) if bias is None else bias.new_empty(bias.shape)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape),
        weight.new_empty(weight.shape),
        grad_bias,
    )


def _ce_loss_and_grads_setup(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
    # Only the gradients some input asks for are kept (not a frozen LM head's).
    ctx.save_for_backward(
        *(
            grad if needed else None
            for grad, needed in zip(
                (grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad[:3], strict=True
            )
        )
    )
    ctx.num_inputs = len(inputs)


def _ce_loss_and_grads_backward(ctx, grad_loss, *_):  # grad_loss: () fp32
    scaled = tuple(None if grad is None else grad * grad_loss for grad in ctx.saved_tensors)
    return (*scaled, *_no_grads(ctx.num_inputs - 3))


ce_loss_and_grads.register_autograd(
    _ce_loss_and_grads_backward, setup_context=_ce_loss_and_grads_setup
)


# --- per-row losses: backward recomputes -----------------------------------------------


@torch.library.custom_op("drift_engine::ce_row_losses", mutates_args=())
def ce_row_losses(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    token_weights: Tensor | None,  # (N,); only checked (with check_labels), not applied
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    schedule: str,
    impl: str,
    check_labels: bool,
) -> Tensor:
    """(N,) fp32 unweighted loss of each row, 0 on ignored rows."""
    opts = _ce_options("none", ignore_index, label_smoothing, z_loss, softcap, chunk_size, schedule)
    ce_forward = backends.ce_forward_of(validation.resolve_impl(impl, hidden.device))
    if check_labels:
        validation.check_label_values(labels, weight.shape[0], ignore_index, token_weights)
    return ce_forward(hidden, weight, bias, labels, opts, None)[0]


@ce_row_losses.register_fake
def _(hidden, *_):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("drift_engine::ce_row_losses_backward", mutates_args=())
def ce_row_losses_backward(
    grad_loss: Tensor,  # (N,)
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
    schedule: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_i grad_loss_i·loss_i: (grad_hidden (N, H), grad_weight (V, H),
    grad_bias (V,), or (0,) without bias)."""
    opts = _ce_options("none", ignore_index, label_smoothing, z_loss, softcap, chunk_size, schedule)
    ce_forward = backends.ce_forward_of(validation.resolve_impl(impl, hidden.device))
    row_coef = grad_loss.float()  # (N,) fp32
    _, _, grad_hidden, grad_weight, grad_bias = ce_forward(
        hidden, weight, bias, labels, opts, row_coef
    )
    return grad_hidden, grad_weight, _absent(weight) if grad_bias is None else grad_bias


@ce_row_losses_backward.register_fake
def _(grad_loss, hidden, weight, bias, *_):
    grad_bias = _absent(weight) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _ce_row_losses_setup(ctx, inputs, output):
    hidden, weight, bias, labels = inputs[:4]
    ctx.save_for_backward(hidden, weight, bias, labels)
    # ignore_index .. impl; check_labels is not needed again.
    ctx.options = inputs[5:12]
    ctx.num_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _ce_row_losses_backward(ctx, grad_loss):  # grad_loss: (N,) or None
    needs = ctx.needs_input_grad[:3]
    if grad_loss is None or not any(needs):
        return _no_grads(ctx.num_inputs)
    hidden, weight, bias, labels = ctx.saved_tensors
    grads = ce_row_losses_backward(grad_loss, hidden, weight, bias, labels, *ctx.options)
    return (
        *(grad if needed else None for grad, needed in zip(grads, needs, strict=True)),
        *_no_grads(ctx.num_inputs - 3),
    )


ce_row_losses.register_autograd(_ce_row_losses_backward, setup_context=_ce_row_losses_setup)


# --- log-probs and entropies ------------------------------------------------------------


@torch.library.custom_op("drift_engine::logprobs", mutates_args=())
def logprobs(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    temperature: float,
    return_entropy: bool,
    ignore_index: int,
    chunk_size: int | None,
    impl: str,
    check_labels: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs (N,), entropy (N,) or (0,) unless return_entropy, lse (N,)), all fp32."""
    opts = LogProbOptions(
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    logprobs_forward, _ = backends.logprobs_functions_of(
        validation.resolve_impl(impl, hidden.device)
    )
    if check_labels:
        validation.check_label_values(labels, weight.shape[0], ignore_index)
    row_logprobs, entropy, lse = logprobs_forward(hidden, weight, bias, labels, opts)
    return row_logprobs, _absent(lse) if entropy is None else entropy, lse


@logprobs.register_fake
def _(hidden, weight, bias, labels, temperature, return_entropy, *_):
    rows = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    entropy = torch.empty_like(rows) if return_entropy else _absent(rows)
    return rows, entropy, torch.empty_like(rows)


@torch.library.custom_op("drift_engine::logprobs_backward", mutates_args=())
def logprobs_backward(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    lse: Tensor,  # (N,) fp32 from logprobs
    grad_logprobs: Tensor | None,  # (N,)
    grad_entropy: Tensor | None,  # (N,)
    temperature: float,
    ignore_index: int,
    chunk_size: int | None,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad_logprobs·logprobs + Σ grad_entropy·entropy: (grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,), or (0,) without bias)."""
    opts = LogProbOptions(
        temperature=temperature,
        return_entropy=grad_entropy is not None,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    _, backward = backends.logprobs_functions_of(validation.resolve_impl(impl, hidden.device))
    grad_hidden, grad_weight, grad_bias = backward(
        hidden,
        weight,
        bias,
        labels,
        lse,
        None if grad_logprobs is None else grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        opts,
    )
    return grad_hidden, grad_weight, _absent(weight) if grad_bias is None else grad_bias


@logprobs_backward.register_fake
def _(hidden, weight, bias, *_):
    grad_bias = _absent(weight) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, return_entropy, ignore_index, chunk_size, impl = (
        inputs[:9]
    )
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    if not return_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.options = (temperature, ignore_index, chunk_size, impl)
    ctx.num_inputs = len(inputs)
    # An output nobody used gets None, so its (zero) contribution is skipped.
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    # grad_logprobs, grad_entropy: (N,) or None
    needs = ctx.needs_input_grad[:3]
    if (grad_logprobs is None and grad_entropy is None) or not any(needs):
        return _no_grads(ctx.num_inputs)
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grads = logprobs_backward(
        hidden, weight, bias, labels, lse, grad_logprobs, grad_entropy, *ctx.options
    )
    return (
        *(grad if needed else None for grad, needed in zip(grads, needs, strict=True)),
        *_no_grads(ctx.num_inputs - 3),
    )


logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# --- what the functional API calls while compiling ---------------------------------------


def linear_cross_entropy(
    hidden: Tensor,  # (N, H) contiguous
    weight: Tensor,  # (V, H) contiguous
    bias: Tensor | None,  # (V,) contiguous
    labels: Tensor,  # (N,) int64 contiguous
    token_weights: Tensor | None,  # (N,) detached
    opts: CrossEntropyOptions,
    impl: str,
    check_labels: bool,
) -> Tensor:
    """``fused_linear_cross_entropy`` through the custom ops (inputs validated)."""
    options = _ce_option_args(opts)
    if opts.reduction == "none":
        weights = backends.masked_token_weights(labels, token_weights, opts.ignore_index)
        loss = ce_row_losses(
            hidden, weight, bias, labels, token_weights, *options, impl, check_labels
        )
        return weights * loss  # (N,) fp32
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not wants_grad:
        # Evaluation: no gradient GEMMs.
        row_coef = backends.row_coefficients(labels, token_weights, opts)  # (N,) fp32
        loss = ce_row_losses(
            hidden, weight, bias, labels, token_weights, *options, impl, check_labels
        )
        return (row_coef * loss).sum()
    return ce_loss_and_grads(
        hidden, weight, bias, labels, token_weights, opts.reduction, *options, impl, check_labels
    )[0]


def linear_logprobs(
    hidden: Tensor,  # (N, H) contiguous
    weight: Tensor,  # (V, H) contiguous
    bias: Tensor | None,  # (V,) contiguous
    labels: Tensor,  # (N,) int64 contiguous
    opts: LogProbOptions,
    impl: str,
    check_labels: bool,
) -> tuple[Tensor, Tensor | None]:
    """``fused_linear_logprobs`` through the custom ops: (logprobs, entropy or None)."""
    row_logprobs, entropy, _ = logprobs(
        hidden,
        weight,
        bias,
        labels,
        opts.temperature,
        opts.return_entropy,
        opts.ignore_index,
        opts.chunk_size,
        impl,
        check_labels,
    )
    return row_logprobs, entropy if opts.return_entropy else None
