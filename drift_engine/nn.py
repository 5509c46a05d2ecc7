"""``nn.Module`` wrappers of the fused linear losses.

The modules hold the options; the LM head's weight (and bias) is passed at call time, so
one module serves a tied or untied head and any model wrapper (FSDP, DDP, LoRA)::

    loss_fn = FusedLinearCrossEntropy(reduction="sum")
    loss = loss_fn(hidden, model.lm_head.weight, labels, token_weights=weights) / normalizer
"""

from __future__ import annotations

import torch
from torch import nn

from drift_engine.ops.cross_entropy import fused_linear_cross_entropy
from drift_engine.ops.logprobs import LogProbs, fused_linear_logprobs
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions
from drift_engine.ops.validation import (
    check_ce_options,
    check_impl,
    check_logprob_options,
)


class FusedLinearCrossEntropy(nn.Module):
    """``fused_linear_cross_entropy`` with fixed options; see that function for semantics."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        chunk_size: int | None = None,
        schedule: str = "auto",
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        # Validated here so a bad option fails at construction, not at the first step.
        check_ce_options(
            CrossEntropyOptions(
                ignore_index=ignore_index,
                reduction=reduction,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                softcap=softcap,
                chunk_size=chunk_size,
                schedule=schedule,
            )
        )
        check_impl(impl)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.impl = impl
        self.chunk_size = chunk_size
        self.schedule = schedule
        self.check_labels = check_labels

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        labels: torch.Tensor,  # (N,)
        *,
        token_weights: torch.Tensor | None = None,  # (N,)
        bias: torch.Tensor | None = None,  # (V,)
    ) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            token_weights=token_weights,
            bias=bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            impl=self.impl,
            chunk_size=self.chunk_size,
            schedule=self.schedule,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, impl={self.impl!r}"
        )


class FusedLinearLogProbs(nn.Module):
    """``fused_linear_logprobs`` with fixed options; see that function for semantics."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        ignore_index: int = -100,
        impl: str = "auto",
        chunk_size: int | None = None,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        check_logprob_options(
            LogProbOptions(
                temperature=temperature,
                return_entropy=return_entropy,
                ignore_index=ignore_index,
                chunk_size=chunk_size,
            )
        )
        check_impl(impl)
        self.temperature = temperature
        self.return_entropy = return_entropy
        self.ignore_index = ignore_index
        self.impl = impl
        self.chunk_size = chunk_size
        self.check_labels = check_labels

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        labels: torch.Tensor,  # (N,)
        *,
        bias: torch.Tensor | None = None,  # (V,)
    ) -> LogProbs:
        return fused_linear_logprobs(
            hidden,
            weight,
            labels,
            temperature=self.temperature,
            return_entropy=self.return_entropy,
            bias=bias,
            ignore_index=self.ignore_index,
            impl=self.impl,
            chunk_size=self.chunk_size,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, return_entropy={self.return_entropy}, "
            f"ignore_index={self.ignore_index}, impl={self.impl!r}"
        )
