"""Fused per-token log-probabilities (and entropies): autograd Function and functional API.

Forward keeps only each row's log-sum-exp; backward recomputes the logits chunk by chunk and
honours arbitrary upstream gradients on both outputs (what PPO/GRPO-style losses need).
Under torch.compile the functional API calls the custom ops of library.py instead of the
autograd Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from drift_engine.ops import library, validation
from drift_engine.ops.backends import logprobs_functions_of
from drift_engine.ops.options import LogProbOptions


class LogProbs(NamedTuple):
    """Output of ``fused_linear_logprobs``: always this type, whatever was asked."""

    logprobs: torch.Tensor  # (N,) fp32, 0 for ignored rows
    entropy: torch.Tensor | None  # (N,) fp32, None unless return_entropy=True


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
        backend: tuple,
    ):
        logprobs_forward, logprobs_backward = backend
        logprobs, entropy, lse = logprobs_forward(hidden, weight, bias, labels, opts)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.opts = opts
        ctx.logprobs_backward = logprobs_backward
        # Unused outputs arrive as None, so their (zero) contribution is skipped.
        ctx.set_materialize_grads(False)
        if opts.return_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        # grad_logprobs, grad_entropy: (N,) or None
        nothing = (None, None, None, None, None, None)
        if (grad_logprobs is None and grad_entropy is None) or not any(ctx.needs_input_grad[:3]):
            return nothing
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = ctx.logprobs_backward(
            hidden,
            weight,
            bias,
            labels,
            lse,
            None if grad_logprobs is None else grad_logprobs.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            ctx.opts,
        )
        needs = ctx.needs_input_grad
        return (
            grad_hidden if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            None,
        )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_labels: bool = True,
) -> LogProbs:
    """Per-token log π(label) (and entropy of π) under logits
    ``(hidden @ weight.T + bias) / temperature``, in fp32, without materialising the logits.

    Args:
        hidden: (N, H) fp32/fp16/bf16 hidden states.
        weight: (V, H) LM-head weight, same dtype and device as ``hidden``.
        labels: (N,) integer token ids in [0, V), or ``ignore_index`` (logprob 0 there).
        temperature: divides the logits (sampling temperature of the policy).
        return_entropy: also return each row's entropy (ignored rows included).
        bias: (V,) optional LM-head bias.
        impl, chunk_size: as in ``fused_linear_cross_entropy``.
        check_labels: check labels lie in [0, V) or equal ``ignore_index`` (one host
            synchronisation); pass False only if the caller validated them already.

    Returns:
        ``LogProbs(logprobs, entropy)``: (N,) fp32 each, entropy None unless asked. Both are
        differentiable w.r.t. hidden, weight and bias with any upstream gradients; backward
        recomputes the logits chunk by chunk.
    """
    opts = LogProbOptions(
        temperature=temperature,
        return_entropy=bool(return_entropy),
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    validation.check_logprob_options(opts)
    validation.check_linear_inputs(hidden, weight, bias, labels)
    tensors = (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        labels.long().contiguous(),
    )
    if torch.compiler.is_compiling():
        # The custom op resolves the backend and checks the labels when the graph runs.
        validation.check_impl(impl)
        return LogProbs(*library.linear_logprobs(*tensors, opts, impl, check_labels))

    backend = validation.resolve_impl(impl, hidden.device)
    if check_labels:
        validation.check_label_values(tensors[3], weight.shape[0], ignore_index)
    outputs = LinearLogProbs.apply(*tensors, opts, logprobs_functions_of(backend))
    if opts.return_entropy:
        logprobs, entropy = outputs
        return LogProbs(logprobs, entropy)
    return LogProbs(outputs, None)
