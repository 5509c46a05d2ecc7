"""The backend functions behind the fused ops, and the per-row coefficients of the loss.

Shared by the eager autograd Functions (cross_entropy.py, logprobs.py) and the custom ops
that torch.compile traces (library.py), so both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from drift_engine.ops import validation
from drift_engine.ops.options import CrossEntropyOptions

CeForward = Callable[..., tuple]


def ce_forward_of(impl: str) -> CeForward:
    """``ce_forward`` of the resolved backend, "torch" or "triton"."""
    if impl == "triton":
        return validation.import_kernel_module("cross_entropy").ce_forward
    from drift_engine.ops import torch_impl

    return torch_impl.ce_forward


def logprobs_functions_of(impl: str) -> tuple[Callable, Callable]:
    """(logprobs_forward, logprobs_backward) of the resolved backend."""
    if impl == "triton":
        module = validation.import_kernel_module("logprobs")
    else:
        from drift_engine.ops import torch_impl as module
    return module.logprobs_forward, module.logprobs_backward


def masked_token_weights(
    labels: torch.Tensor,  # (N,) int64
    token_weights: torch.Tensor | None,  # (N,)
    ignore_index: int,
) -> torch.Tensor:
    """(N,) fp32 token weights, 0 on ignored rows (1 elsewhere when none are given)."""
    valid = labels != ignore_index
    if token_weights is None:
        return valid.float()
    return torch.where(valid, token_weights.float(), 0.0)


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
