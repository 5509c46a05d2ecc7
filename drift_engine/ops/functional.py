"""The functional API of the fused ops: ``fused_linear_cross_entropy`` and
``fused_linear_logprobs``.

Neither holds the (N, V) logits. Each builds its options object from its keyword arguments
and hands it to the autograd layer (autograd.py), which validates the inputs and runs the
autograd Function over the custom ops of library.py.
"""

from __future__ import annotations

import torch

from drift_engine.kernels.labels import IGNORE_INDEX
from drift_engine.ops.autograd import LogProbs, linear_cross_entropy, linear_logprobs
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
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
        impl=impl,
        check_labels=check_labels,
    )
    return linear_cross_entropy(
        hidden, weight, labels, opts, token_weights=token_weights, bias=bias
    )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
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
        impl=impl,
        check_labels=check_labels,
    )
    return linear_logprobs(hidden, weight, labels, opts, bias=bias)
