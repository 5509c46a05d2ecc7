"""The two backends behind the fused ops, and the one place that chooses between them.

``resolve_impl`` turns ``impl`` ("auto", "triton", "torch") and the tensors' device into
the backend that runs; ``ce_forward``, ``logprobs_forward`` and ``logprobs_backward`` run
it: the chunked PyTorch functions of torch_impl.py, which read the options object, or the
Triton launchers of drift_engine.kernels, which take plain numbers as keyword arguments
named after the options' fields (``launcher_options``). Only the custom ops of library.py
call these, so eager and torch.compile run the same code.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from types import ModuleType

import torch

from drift_engine.ops import torch_impl
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions
from drift_engine.ops.validation import FusedOpError, check_impl

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def resolve_impl(impl: str, device: torch.device) -> str:
    """The backend that runs: "torch" or "triton".

    "auto" picks Triton for CUDA tensors when triton is installed, and the chunked PyTorch
    backend otherwise. "triton" on CPU tensors needs the Triton interpreter
    (TRITON_INTERPRET=1, set before drift_engine.kernels is imported).
    """
    check_impl(impl)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if not _triton_available():
        raise FusedOpError(
            "impl='triton' needs the triton package, which is not importable here; install "
            "triton or pass impl='torch' (or impl='auto' to choose automatically)"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusedOpError(
            f"impl='triton' runs on CUDA tensors, got tensors on {device}; move them to a GPU, "
            "pass impl='torch', or set TRITON_INTERPRET=1 before importing drift_engine to run "
            "the kernels in Triton's (slow) interpreter"
        )
    return "triton"


_TRITON_AVAILABLE: bool | None = None


def _triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_AVAILABLE = False
        else:
            _TRITON_AVAILABLE = True
    return _TRITON_AVAILABLE


def _kernels(name: str) -> ModuleType:
    """``drift_engine.kernels.cross_entropy`` or ``.logprobs``, imported on first use (they
    import triton), with a clear error if that fails."""
    try:
        if name == "cross_entropy":
            from drift_engine.kernels import cross_entropy as module
        else:
            from drift_engine.kernels import logprobs as module
    except ImportError as error:
        raise FusedOpError(
            f"impl='triton' could not import drift_engine.kernels.{name} ({error}); pass "
            "impl='torch' to use the PyTorch backend"
        ) from error
    return module


@functools.cache
def _launcher_keywords(launcher: Callable) -> tuple[str, ...]:
    return tuple(
        name
        for name, parameter in inspect.signature(launcher).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def launcher_options(launcher: Callable, opts: CrossEntropyOptions | LogProbOptions) -> dict:
    """The options a Triton launcher takes: its keyword-only parameters are named after
    fields of the options object, so each reads the fields it needs by name."""
    return {name: getattr(opts, name) for name in _launcher_keywords(launcher)}


def ce_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    row_coef: torch.Tensor | None,  # (N,) fp32
    opts: CrossEntropyOptions,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss (N,) fp32, grad_hidden, grad_weight, grad_bias) of the backend ``opts.impl``
    resolves to; the gradients (of Σ row_coef·loss) are None without ``row_coef``."""
    if resolve_impl(opts.impl, hidden.device) == "torch":
        loss, _, *grads = torch_impl.ce_forward(hidden, weight, bias, labels, opts, row_coef)
    else:
        launcher = _kernels("cross_entropy").ce_forward
        loss, _, *grads = launcher(
            hidden, weight, bias, labels, row_coef, **launcher_options(launcher, opts)
        )
    return (loss, *grads)


def logprobs_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    opts: LogProbOptions,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logprobs (N,), entropy (N,) or None, lse (N,)), all fp32."""
    if resolve_impl(opts.impl, hidden.device) == "torch":
        return torch_impl.logprobs_forward(hidden, weight, bias, labels, opts)
    launcher = _kernels("logprobs").logprobs_forward
    return launcher(hidden, weight, bias, labels, **launcher_options(launcher, opts))


def logprobs_backward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    lse: torch.Tensor,  # (N,) fp32 from logprobs_forward
    grad_logprobs: torch.Tensor | None,  # (N,) contiguous
    grad_entropy: torch.Tensor | None,  # (N,) contiguous
    opts: LogProbOptions,
) -> Grads:
    """Gradients of Σ grad_logprobs·logprobs + Σ grad_entropy·entropy w.r.t. hidden, weight
    and bias (None without bias)."""
    if resolve_impl(opts.impl, hidden.device) == "torch":
        return torch_impl.logprobs_backward(
            hidden, weight, bias, labels, lse, grad_logprobs, grad_entropy, opts
        )
    launcher = _kernels("logprobs").logprobs_backward
    return launcher(
        hidden,
        weight,
        bias,
        labels,
        lse,
        grad_logprobs,
        grad_entropy,
        **launcher_options(launcher, opts),
    )
