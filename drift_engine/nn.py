"""``nn.Module`` wrappers of the fused linear losses.

Each module holds one options object (``self.options``); the LM head's weight (and bias) is
passed at call time, so one module serves a tied or untied head and any model wrapper
(FSDP, DDP, LoRA)::

    loss_fn = FusedLinearCrossEntropy(reduction="sum")
    loss = loss_fn(hidden, model.lm_head.weight, labels, token_weights=weights) / normalizer

The keyword arguments are the fields of ``CrossEntropyOptions`` / ``LogProbOptions`` (the
same as the functional API's); an options object may be given instead, or as a base that
the keywords override.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from drift_engine.ops.autograd import LogProbs, linear_cross_entropy, linear_logprobs
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions
from drift_engine.ops.validation import check_ce_options, check_logprob_options


def _options_repr(options: CrossEntropyOptions | LogProbOptions) -> str:
    return ", ".join(
        f"{field.name}={getattr(options, field.name)!r}" for field in dataclasses.fields(options)
    )


class FusedLinearCrossEntropy(nn.Module):
    """``fused_linear_cross_entropy`` with fixed options; see that function for semantics."""

    def __init__(self, options: CrossEntropyOptions | None = None, **fields) -> None:
        super().__init__()
        self.options = dataclasses.replace(
            CrossEntropyOptions() if options is None else options, **fields
        )
        # Validated here so a bad option fails at construction, not at the first step.
        check_ce_options(self.options)

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        labels: torch.Tensor,  # (N,)
        *,
        token_weights: torch.Tensor | None = None,  # (N,)
        bias: torch.Tensor | None = None,  # (V,)
    ) -> torch.Tensor:
        return linear_cross_entropy(
            hidden, weight, labels, self.options, token_weights=token_weights, bias=bias
        )

    def extra_repr(self) -> str:
        return _options_repr(self.options)


class FusedLinearLogProbs(nn.Module):
    """``fused_linear_logprobs`` with fixed options; see that function for semantics."""

    def __init__(self, options: LogProbOptions | None = None, **fields) -> None:
        super().__init__()
        self.options = dataclasses.replace(
            LogProbOptions() if options is None else options, **fields
        )
        check_logprob_options(self.options)

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        labels: torch.Tensor,  # (N,)
        *,
        bias: torch.Tensor | None = None,  # (V,)
    ) -> LogProbs:
        return linear_logprobs(hidden, weight, labels, self.options, bias=bias)

    def extra_repr(self) -> str:
        return _options_repr(self.options)
