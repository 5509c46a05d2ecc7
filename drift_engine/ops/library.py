"""The fused ops as ``torch.library`` custom ops: the one path, eager and compiled.

The autograd layer (autograd.py) calls these ops while ``torch.compile`` traces it, and
through ``run_op`` in eager mode, which on plain tensors calls an op's implementation
directly: the same code without the dispatcher's Python layers, which cost about as much
as the GEMMs of a small LM head (60 µs a call on CPU). Each op is opaque to the compiler: its real implementation
checks the labels (a host sync, when ``check_labels``), resolves the backend and runs the
chunk loop or the Triton launches at run time; its fake implementation gives the output
shapes from the input shapes, so a new number of tokens N needs no recompile.

The options object travels through each op as its fields: the op schemas are generated from
the fields of ``CrossEntropyOptions`` / ``LogProbOptions`` (in order, after the tensors),
``option_values(opts)`` flattens an object into them and the implementation rebuilds it
with ``Options(*values)``. An absent tensor output (no gradient asked, no bias, no entropy)
is an empty tensor.

Ops in the ``drift_engine`` namespace:

    ce_forward          per-row losses (N,); with row_coef also the gradients of
                        Σ_i row_coef_i·loss_i w.r.t. hidden, weight and bias
    logprobs_forward    log-probs, entropies and log-sum-exps (N,) each
    logprobs_backward   gradients for upstream grads of log-probs and/or entropies
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import torch
from torch import Tensor

from drift_engine.ops import backends, validation
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions

Options = CrossEntropyOptions | LogProbOptions

_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def _schema_type(hint: object) -> str:
    """The torch schema type of one option field: int, float, bool, str (a Literal of
    strings), with ``?`` when it may be None."""
    if typing.get_origin(hint) is typing.Literal:
        return "str"
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return f"{_schema_type(inner)}?"
    return _SCHEMA_TYPES[hint]


def _fields_schema(options_type: type) -> str:
    hints = typing.get_type_hints(options_type)
    return ", ".join(
        f"{_schema_type(hints[field.name])} {field.name}"
        for field in dataclasses.fields(options_type)
    )


_FIELD_NAMES = {
    options_type: tuple(field.name for field in dataclasses.fields(options_type))
    for options_type in (CrossEntropyOptions, LogProbOptions)
}


def option_values(opts: Options) -> tuple:
    """The fields of ``opts`` in declaration order: the trailing arguments of its ops."""
    return tuple(getattr(opts, name) for name in _FIELD_NAMES[type(opts)])


_IMPLEMENTATIONS: dict[str, Callable] = {}


def _custom_op(name: str, tensors: str, options_type: type, returns: str, fake: Callable):
    def define(fn: Callable):
        schema = f"({tensors}, {_fields_schema(options_type)}) -> {returns}"
        op = torch.library.custom_op(f"drift_engine::{name}", fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
        _IMPLEMENTATIONS[name] = fn
        return op

    return define


def plain_eager(*tensors: Tensor | None) -> bool:
    """Whether these tensors (None skipped) are plain tensors or parameters in eager mode:
    not under torch.compile, no other tensor subclass (fake and functional tensors of a
    trace), none wrapped by a torch.func transform (vmap, grad)."""
    if torch.compiler.is_compiling():
        return False
    return all(
        tensor is None
        or (
            type(tensor) in (Tensor, torch.nn.Parameter)
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        )
        for tensor in tensors
    )


def run_op(name: str, *args):
    """``torch.ops.drift_engine.<name>(*args)``. In eager mode on plain tensors, its
    implementation called directly (under no_grad: its outputs are not differentiable
    through ATen, as the op's are not); otherwise (``plain_eager`` false) the op itself."""
    if plain_eager(*args[:3]):  # hidden, weight, bias
        with torch.no_grad():
            return _IMPLEMENTATIONS[name](*args)
    return getattr(torch.ops.drift_engine, name)(*args)


def _absent(like: Tensor) -> Tensor:
    """The empty tensor that stands for a missing tensor output."""
    return like.new_empty(0)


def _linear_grads_like(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    grad_bias = _absent(weight) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _present_grads(grads: tuple, hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is None:
        return _absent(hidden), _absent(weight), _absent(weight)
    return grad_hidden, grad_weight, _absent(weight) if grad_bias is None else grad_bias


# --- cross-entropy ------------------------------------------------------------------------


def _ce_forward_fake(hidden, weight, bias, labels, token_weights, row_coef, *options):
    loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    if row_coef is None:
        return loss, _absent(hidden), _absent(weight), _absent(weight)
    return (loss, *_linear_grads_like(hidden, weight, bias))


@_custom_op(
    "ce_forward",
    "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? token_weights, "
    "Tensor? row_coef",
    CrossEntropyOptions,
    "(Tensor, Tensor, Tensor, Tensor)",
    _ce_forward_fake,
)
def ce_forward(
    hidden: Tensor,  # (N, H) contiguous
    weight: Tensor,  # (V, H) contiguous
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    token_weights: Tensor | None,  # (N,): only checked (with check_labels), not applied
    row_coef: Tensor | None,  # (N,) fp32
    *options,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (N,) fp32 unweighted, 0 on ignored rows; grad_hidden (N, H), grad_weight (V, H),
    grad_bias (V,) of Σ_i row_coef_i·loss_i), the gradients (0,) without row_coef and
    grad_bias (0,) without bias."""
    opts = CrossEntropyOptions(*options)
    if opts.check_labels:
        validation.check_label_values(labels, weight.shape[0], opts.ignore_index, token_weights)
    loss, *grads = backends.ce_forward(hidden, weight, bias, labels, row_coef, opts)
    return (loss, *_present_grads(grads, hidden, weight))


# --- log-probs and entropies --------------------------------------------------------------


def _logprobs_forward_fake(hidden, weight, bias, labels, *options):
    rows = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    entropy = torch.empty_like(rows) if LogProbOptions(*options).return_entropy else _absent(rows)
    return rows, entropy, torch.empty_like(rows)


@_custom_op(
    "logprobs_forward",
    "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels",
    LogProbOptions,
    "(Tensor, Tensor, Tensor)",
    _logprobs_forward_fake,
)
def logprobs_forward(
    hidden: Tensor,  # (N, H) contiguous
    weight: Tensor,  # (V, H) contiguous
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    *options,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs (N,), entropy (N,) or (0,) unless return_entropy, lse (N,)), all fp32."""
    opts = LogProbOptions(*options)
    if opts.check_labels:
        validation.check_label_values(labels, weight.shape[0], opts.ignore_index)
    logprobs, entropy, lse = backends.logprobs_forward(hidden, weight, bias, labels, opts)
    return logprobs, _absent(lse) if entropy is None else entropy, lse


def _logprobs_backward_fake(hidden, weight, bias, *_):
    return _linear_grads_like(hidden, weight, bias)


@_custom_op(
    "logprobs_backward",
    "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
    "Tensor? grad_logprobs, Tensor? grad_entropy",
    LogProbOptions,
    "(Tensor, Tensor, Tensor)",
    _logprobs_backward_fake,
)
def logprobs_backward(
    hidden: Tensor,  # (N, H) contiguous
    weight: Tensor,  # (V, H) contiguous
    bias: Tensor | None,  # (V,)
    labels: Tensor,  # (N,) int64
    lse: Tensor,  # (N,) fp32 from logprobs_forward
    grad_logprobs: Tensor | None,  # (N,)
    grad_entropy: Tensor | None,  # (N,)
    *options,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad_logprobs·logprobs + Σ grad_entropy·entropy: (grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,), or (0,) without bias)."""
    grads = backends.logprobs_backward(
        hidden,
        weight,
        bias,
        labels,
        lse,
        None if grad_logprobs is None else grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        LogProbOptions(*options),
    )
    return _present_grads(grads, hidden, weight)
