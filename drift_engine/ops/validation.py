"""Input validation of the fused ops.

Every check here runs before any kernel is launched, so that a wrong shape, dtype, device or
label becomes a clear `FusedOpError` instead of a device-side assert or a silently wrong
answer. All checks are on metadata (free) except the label-range / token-weight value check,
which costs one host synchronisation and can be skipped with ``check_labels=False``. Under
torch.compile the metadata checks run while tracing and the value check inside the custom
ops (library.py), each time the graph runs. Choosing the backend is backends.py's.
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from drift_engine.errors import DriftError
from drift_engine.ops.options import (
    CrossEntropyOptions,
    Impl,
    LogProbOptions,
    Reduction,
    Schedule,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = get_args(Impl)
REDUCTIONS = get_args(Reduction)
SCHEDULES = get_args(Schedule)


class FusedOpError(DriftError):
    """fused_linear_cross_entropy / fused_linear_logprobs got an invalid input or option,
    or were used in a way they do not support."""


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise FusedOpError(f"impl={impl!r} is not one of {IMPLS}")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise FusedOpError(
            f"chunk_size={chunk_size!r} must be a positive int (rows of logits per chunk) or None"
        )


def check_ce_options(opts: CrossEntropyOptions) -> None:
    """Reject option values that have no meaning (before any work is done)."""
    if opts.reduction not in REDUCTIONS:
        raise FusedOpError(f"reduction={opts.reduction!r} is not one of {REDUCTIONS}")
    if not (0.0 <= opts.label_smoothing <= 1.0):
        raise FusedOpError(f"label_smoothing={opts.label_smoothing!r} must be in [0, 1]")
    # Chained comparisons rather than math.isfinite: they also hold for the symbolic floats
    # of a torch.compile trace (and reject NaN, which compares False).
    if not (0.0 <= opts.z_loss < math.inf):
        raise FusedOpError(f"z_loss={opts.z_loss!r} must be a finite number >= 0")
    if opts.softcap is not None and not (0.0 < opts.softcap < math.inf):
        raise FusedOpError(
            f"softcap={opts.softcap!r} must be a finite number > 0, or None for no cap"
        )
    if isinstance(opts.ignore_index, bool) or not isinstance(opts.ignore_index, int):
        raise FusedOpError(f"ignore_index={opts.ignore_index!r} must be an int")
    if opts.schedule not in SCHEDULES:
        raise FusedOpError(f"schedule={opts.schedule!r} is not one of {SCHEDULES}")
    check_chunk_size(opts.chunk_size)
    check_impl(opts.impl)


def check_logprob_options(opts: LogProbOptions) -> None:
    if not (0.0 < opts.temperature < math.inf):
        raise FusedOpError(f"temperature={opts.temperature!r} must be a finite number > 0")
    if isinstance(opts.ignore_index, bool) or not isinstance(opts.ignore_index, int):
        raise FusedOpError(f"ignore_index={opts.ignore_index!r} must be an int")
    check_chunk_size(opts.chunk_size)
    check_impl(opts.impl)


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of hidden (N, H), weight (V, H), bias (V,), labels (N,),
    token_weights (N,). Metadata only: no host synchronisation."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise FusedOpError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2:
        raise FusedOpError(
            f"hidden must be 2-D (N, H), got {_describe(hidden)}; flatten batch and sequence "
            "dimensions first, e.g. hidden.reshape(-1, hidden.shape[-1])"
        )
    if weight.dim() != 2:
        raise FusedOpError(f"weight must be 2-D (V, H), got {_describe(weight)}")
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise FusedOpError(
            f"weight {_describe(weight)} does not match hidden {_describe(hidden)}: weight must "
            f"be (V, H) with H = {hidden_size} (pass the LM head's weight, not its transpose)"
        )
    if vocab_size == 0 or hidden_size == 0:
        raise FusedOpError(
            f"weight {_describe(weight)} must have a non-empty vocabulary and hidden size"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise FusedOpError(
            f"hidden has dtype {hidden.dtype}; supported dtypes are float32, float16, bfloat16"
        )
    if weight.dtype != hidden.dtype:
        raise FusedOpError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of "
            "them so both match"
        )
    if weight.device != hidden.device:
        raise FusedOpError(
            f"weight is on {weight.device} but hidden is on {hidden.device}; move them to one device"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise FusedOpError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (vocab_size,):
            raise FusedOpError(f"bias must have shape ({vocab_size},), got {_describe(bias)}")
        if bias.dtype != weight.dtype:
            raise FusedOpError(
                f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}; cast it to match"
            )
        if bias.device != hidden.device:
            raise FusedOpError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if labels.dim() != 1 or labels.shape[0] != num_tokens:
        raise FusedOpError(
            f"labels must be 1-D with one entry per row of hidden ({num_tokens},), got "
            f"{_describe(labels)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise FusedOpError(
            f"labels must be an integer tensor (token ids), got dtype {labels.dtype}"
        )
    if labels.device != hidden.device:
        raise FusedOpError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise FusedOpError(
                f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}"
            )
        if token_weights.shape != (num_tokens,):
            raise FusedOpError(
                f"token_weights must have shape ({num_tokens},) (one weight per row of hidden), "
                f"got {_describe(token_weights)}"
            )
        if not token_weights.dtype.is_floating_point:
            raise FusedOpError(
                f"token_weights must be floating point, got dtype {token_weights.dtype}"
            )
        if token_weights.device != hidden.device:
            raise FusedOpError(
                f"token_weights are on {token_weights.device} but hidden is on {hidden.device}"
            )


def check_label_values(
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    token_weights: torch.Tensor | None = None,
) -> None:
    """Labels in [0, vocab_size) or ignore_index; token weights finite and >= 0.

    Costs one host synchronisation (both checks are reduced on the device and read together).
    """
    if labels.numel() == 0:
        return
    bad_label = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)  # (N,)
    flags = [bad_label.any()]
    if token_weights is not None:
        # the fp32 values the ops use (a float64 1e39 is inf there, -1e-50 is -0.0)
        token_weights = token_weights.float()
        flags.append(((token_weights < 0) | ~torch.isfinite(token_weights)).any())
    found = torch.stack(flags).tolist()
    if found[0]:
        # Error path only: the extra syncs below are fine here.
        first = int(bad_label.nonzero()[0, 0])
        raise FusedOpError(
            f"labels[{first}] = {int(labels[first])} is outside [0, {vocab_size}) and is not "
            f"ignore_index ({ignore_index}); mark ignored positions with ignore_index or check the "
            "tokenizer's vocabulary size against the LM head"
        )
    if len(found) > 1 and found[1]:
        bad_weight = (token_weights < 0) | ~torch.isfinite(token_weights)
        first = int(bad_weight.nonzero()[0, 0])
        raise FusedOpError(
            f"token_weights[{first}] = {float(token_weights[first])} is negative or not finite; "
            "importance weights must be finite and >= 0"
        )
