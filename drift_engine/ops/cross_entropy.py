"""Fused (importance-weighted) linear cross-entropy: autograd Functions and functional API.

The loss of every row is computed from the hidden states and the LM head without ever
holding the (N, V) logits. With reduction "mean"/"sum" the loss is a scalar whose
per-row coefficients (the token weights, normalised for "mean") are known in forward, so
its gradient is computed in the same pass (three GEMMs, no recompute) and backward only
scales it by the upstream gradient. With reduction "none" backward recomputes the logits
chunk by chunk with each row's upstream gradient as its coefficient.

The autograd Functions here are the eager path; under torch.compile the functional API
calls the custom ops of library.py, which run the same backends.
"""

from __future__ import annotations

import torch

from drift_engine.ops import library, validation
from drift_engine.ops.backends import (
    CeForward,
    ce_forward_of,
    masked_token_weights,
    row_coefficients,
)
from drift_engine.ops.options import CrossEntropyOptions


def _scalar_loss_value(hidden, weight, bias, labels, token_weights, opts, ce_forward):
    """The "mean"/"sum" loss when no gradient is wanted: one pass, no gradient GEMMs."""
    row_coef = row_coefficients(labels, token_weights, opts)  # (N,) fp32
    loss = ce_forward(hidden, weight, bias, labels, opts, None)[0]  # (N,) fp32
    return (row_coef * loss).sum()


class WeightedLinearCrossEntropy(torch.autograd.Function):
    """Scalar loss Σ_i c_i·loss_i with c = w ("sum") or w / Σw ("mean"); grads in forward.

    The gradients are handed out by the first backward call (scaled in place, then
    released), so backward can run once per forward: a second backward through the same
    graph (``retain_graph=True``) raises instead of returning stale gradients.
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
        ce_forward: CeForward,
    ) -> torch.Tensor:
        row_coef = row_coefficients(labels, token_weights, opts)  # (N,) fp32
        loss, _, grad_hidden, grad_weight, grad_bias = ce_forward(
            hidden, weight, bias, labels, opts, row_coef
        )
        # Held until backward: drop those no input asks for (e.g. a frozen LM head's).
        ctx.grads = tuple(
            grad if needed else None
            for grad, needed in zip(
                (grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad[:3], strict=True
            )
        )
        ctx.consumed = False
        return (row_coef * loss).sum()  # () fp32

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # grad_output: () fp32
        if ctx.consumed:
            raise validation.FusedOpError(
                "backward ran twice through one fused_linear_cross_entropy(reduction='mean' or "
                "'sum') call; its gradients are computed in forward and handed out once. "
                "Recompute the loss for each backward pass"
            )
        ctx.consumed = True
        grads, ctx.grads = ctx.grads, None
        results = [None, None, None]
        for index, grad in enumerate(grads):
            if grad is not None:
                # In place: these buffers belong to this call alone. The fp32 scale is applied
                # in fp32 and rounded once to the gradient's dtype.
                results[index] = grad.mul_(grad_output)
        return (*results, None, None, None, None)


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
        ce_forward: CeForward,
    ) -> torch.Tensor:
        weights = masked_token_weights(labels, token_weights, opts.ignore_index)  # (N,) fp32
        loss, _, _, _, _ = ce_forward(hidden, weight, bias, labels, opts, None)
        ctx.save_for_backward(hidden, weight, bias, labels, weights)
        ctx.opts = opts
        ctx.ce_forward = ce_forward
        ctx.set_materialize_grads(False)
        return weights * loss  # (N,) fp32

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor | None):  # grad_output: (N,)
        if grad_output is None or not any(ctx.needs_input_grad[:3]):
            return None, None, None, None, None, None, None
        hidden, weight, bias, labels, weights = ctx.saved_tensors
        row_coef = grad_output.float() * weights  # (N,) fp32
        _, _, grad_hidden, grad_weight, grad_bias = ctx.ce_forward(
            hidden, weight, bias, labels, ctx.opts, row_coef
        )
        needs = ctx.needs_input_grad
        return (
            grad_hidden if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_size: int | None = None,
    schedule: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, computed in fp32
    without materialising the logits, with optional per-token importance weights.

    Args:
        hidden: (N, H) fp32/fp16/bf16 hidden states (flatten batch and sequence first).
        weight: (V, H) LM-head weight, same dtype and device as ``hidden``.
        labels: (N,) integer target ids in [0, V), or ``ignore_index`` for untrained rows.
        token_weights: (N,) floating coefficient of each row's loss (e.g. DRIFT importance
            weights spread over a trajectory's tokens). Treated as constants: no gradient
            flows to them.
        bias: (V,) optional LM-head bias.
        reduction: "mean" = Σ w·loss / Σ w over non-ignored rows (PyTorch's weighted-mean
            convention), "sum" = Σ w·loss, "none" = w·loss per row, shape (N,).
        label_smoothing, z_loss, softcap: per-row loss
            ``(1-ε)(lse - s_y) + ε(lse - mean(s)) + z_loss·lse²`` over logits
            ``s = softcap·tanh(x / softcap)`` (no cap when None).
        impl: "triton", "torch" (chunked PyTorch, any device) or "auto" (Triton on CUDA).
        chunk_size: rows of logits materialised at once; None chooses from the problem size.
        schedule: how the Triton backend walks the logits ("auto", "token_chunks",
            "vocab_slabs"); see ``CrossEntropyOptions``. Ignored by the torch backend.
        check_labels: check that labels lie in [0, V) or equal ``ignore_index`` and that token
            weights are finite and >= 0. Costs one host synchronisation; pass False only if
            the caller validated them already (an out-of-range label then gives a wrong
            result or a device-side error).

    Returns:
        fp32 scalar ("mean", "sum") or (N,) fp32 ("none"). A batch whose rows are all ignored
        gives loss 0 and zero gradients. Gradients w.r.t. hidden, weight and bias are exact and
        in the inputs' dtypes; the weight's is accumulated in fp32.

    With "mean"/"sum" the gradients are computed during forward, so backward is only a
    scaling, and may run once per forward call (not twice with ``retain_graph=True``).
    """
    opts = CrossEntropyOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        schedule=schedule,
    )
    validation.check_ce_options(opts)
    validation.check_linear_inputs(hidden, weight, bias, labels, token_weights)
    tensors = (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        labels.long().contiguous(),
        None if token_weights is None else token_weights.detach(),
    )
    if torch.compiler.is_compiling():
        # The custom ops resolve the backend and check the labels when the graph runs.
        validation.check_impl(impl)
        return library.linear_cross_entropy(*tensors, opts, impl, check_labels)

    backend = validation.resolve_impl(impl, hidden.device)
    if check_labels:
        validation.check_label_values(tensors[3], weight.shape[0], ignore_index, token_weights)
    args = (*tensors, opts, ce_forward_of(backend))
    if reduction == "none":
        return PerTokenLinearCrossEntropy.apply(*args)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not wants_grad:
        # Evaluation: skip the gradient GEMMs that the Function would run in forward.
        with torch.no_grad():
            return _scalar_loss_value(*args)
    return WeightedLinearCrossEntropy.apply(*args)
