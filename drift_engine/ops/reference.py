"""Dense reference implementations of the fused ops, for tests and benchmarks.

They materialise the full (N, V) logits and let autograd differentiate them, so they are
simple enough to trust and far too memory-hungry to train with. By default all math is
float64 (the ground truth); ``logits_dtype`` instead reproduces PyTorch's usual dense path
(logits from a GEMM in the inputs' dtype, loss in fp32), whose error against the float64
truth is the yardstick the fused implementations are held to.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from drift_engine.kernels.labels import IGNORE_INDEX


class ReferenceLogProbs(NamedTuple):
    logprobs: torch.Tensor  # (N,)
    entropy: torch.Tensor  # (N,)


def reference_logits(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None = None,  # (V,)
    *,
    softcap: float | None = None,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(N, V) logits ``softcap(hidden @ weight.T + bias)``: float64 throughout by default;
    with ``logits_dtype``, the GEMM in the inputs' dtype (PyTorch's dense path) and the
    result upcast to ``logits_dtype``. Their log-sum-exp is the ``lse`` of the backends."""
    if logits_dtype is None:
        logits = hidden.double() @ weight.double().T
        if bias is not None:
            logits = logits + bias.double()
    else:
        logits = hidden @ weight.T
        if bias is not None:
            logits = logits + bias
        logits = logits.to(logits_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def cross_entropy_reference(
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
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense (weighted) linear cross-entropy with the semantics of
    ``fused_linear_cross_entropy``; differentiable through autograd.

    Per row, over s = softcap(hidden @ weight.T + bias) and lse = logsumexp(s):
    loss = (1-ε)(lse - s_y) + ε(lse - mean_j s_j) + z·lse², 0 where labels == ignore_index.
    "sum" = Σ w·loss, "mean" = Σ w·loss / Σ_{non-ignored} w (0 if that sum is 0),
    "none" = w·loss per row.
    """
    logits = reference_logits(
        hidden, weight, bias, softcap=softcap, logits_dtype=logits_dtype
    )  # (N, V)
    valid = labels != ignore_index  # (N,)
    safe_labels = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(logits, dim=1)  # (N,)
    target = logits.gather(1, safe_labels.unsqueeze(1)).squeeze(1)  # (N,)
    loss = (1.0 - label_smoothing) * (lse - target)
    loss = loss + label_smoothing * (lse - logits.mean(dim=1)) + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    row_weights = torch.ones_like(loss) if token_weights is None else token_weights.to(loss.dtype)
    row_weights = torch.where(valid, row_weights, 0.0)
    weighted = row_weights * loss
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    normaliser = row_weights.sum()
    return total / torch.where(normaliser > 0, normaliser, 1.0)


def logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    logits_dtype: torch.dtype | None = None,
) -> ReferenceLogProbs:
    """Dense per-token log-probabilities of ``labels`` and entropies of each row's
    distribution at ``temperature``; differentiable through autograd. Ignored rows get
    logprob 0; their entropy is still computed (as in ``LogProbOptions``)."""
    logits = reference_logits(hidden, weight, bias, logits_dtype=logits_dtype) / temperature
    log_probs = torch.log_softmax(logits, dim=1)  # (N, V)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    target = log_probs.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    return ReferenceLogProbs(torch.where(valid, target, 0.0), entropy)


__all__ = ["ReferenceLogProbs", "cross_entropy_reference", "logprobs_reference", "reference_logits"]
