"""Regional compilation: ``torch.compile`` on each decoder layer of a causal LM.

The decoder layers of a small model spend much of their time in memory-bound elementwise
work (RMSNorm in fp32, rotary embeddings, SiLU·mul, residual adds, the autocast casts of
fp32 weights) and in kernel launches. Compiling each layer fuses that work; the
embeddings, the final norm and the fused loss stay eager. All layers of one architecture
share the compiled code (a layer's parameters are inputs of the graph, not constants), so
the compile cost is that of one layer, whatever the depth::

    model = load_model(...)
    model = prepare_model(model, ctx)            # FSDP2 / DDP first: see below
    compile_decoder_layers(unwrap_model(model))

What is compiled is each layer's ``forward`` (an instance attribute replaces the class's),
not ``Module.__call__``: module hooks, FSDP2's all-gather and reshard hooks among them, keep
running eagerly around the compiled code, as they do around torchtitan's compiled blocks.

Order with the other wrappers:

- Gradient checkpointing: transformers 5.24's ``GradientCheckpointingLayer`` checkpoints
  inside the class's ``forward``, so the compiled code contains the checkpoint
  (torchtitan's compile(checkpoint(block)) order) and the recomputation is part of the
  compiled backward. transformers 5.17 checkpoints around ``__call__``: the eager
  checkpoint re-runs the compiled forward in backward. Both are exact.
- FSDP2: compile after ``fully_shard``. ``fully_shard`` swaps the layer's class for a
  subclass whose ``forward`` transformers 5.24 wraps again; a ``forward`` bound before the
  swap is the inner wrapper, which skips checkpointing as it is not the outermost one.
- DDP and peft (LoRA): the layers are compiled in place, so wrapping before or after is
  the same; parameter names and state dicts do not change.

Dynamic shapes. A packed micro-batch's token count changes every step, and so do its
number of sequences (``cu_seq_lens_q``) and its longest sequence (``max_length_q``). Before
each call, the token dimension of every tensor argument and the length of the boundaries
are marked dynamic, so the first compile is already dynamic in them; the integer lengths
become dynamic at their first change (PyTorch's automatic dynamic shapes), which costs
one recompile. After that, new micro-batches reuse the compiled code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from drift_engine.attention.varlen import probe_kernels
from drift_engine.errors import ConfigError
from drift_engine.models.layers import decoder_layers

DEFAULT_BACKEND = "inductor"

# transformers' keyword arguments for packed sequences' boundaries, (S+1,) each
_BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")


def compile_backends() -> list[str]:
    """Names ``torch.compile`` accepts as ``backend`` ("inductor", "aot_eager", ...)."""
    return torch._dynamo.list_backends(exclude_tags=())


def check_compile_backend(backend: str) -> None:
    """Raise ConfigError unless ``torch.compile`` can run here with ``backend``."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "model.compile needs torch.compile, which this Python and PyTorch build do not "
            "support; turn model.compile off"
        )
    known = compile_backends()
    if backend not in known:
        raise ConfigError(
            f"model.compile_backend {backend!r} is not a torch.compile backend; "
            f"known: {', '.join(known)}"
        )


def compile_decoder_layers(model: nn.Module, *, backend: str = DEFAULT_BACKEND) -> list[nn.Module]:
    """Compile the ``forward`` of every decoder layer of ``model`` in place; return the layers.

    ``model`` is the Hugging Face model (or its peft wrapper), after any ``fully_shard``; under
    DDP pass the inner module (``unwrap_model``). Call it once, before training. The layers
    are found as FSDP2 finds its units (:func:`~drift_engine.models.layers.decoder_layers`);
    a layer nested in another found layer is compiled as part of its parent.
    """
    check_compile_backend(backend)
    try:
        layers = _outermost(decoder_layers(model))
    except ConfigError:
        raise ConfigError(
            f"model.compile: cannot find the decoder layers of {type(model).__name__} (it "
            "names no _no_split_modules and holds no nn.ModuleList); turn model.compile off"
        ) from None
    # Kernel lookups (imports, signatures) must not run inside the traced code.
    probe_kernels()
    for layer in layers:
        layer.forward = _compiled_forward(layer.forward, backend)
    return layers


def _outermost(layers: list[nn.Module]) -> list[nn.Module]:
    nested = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
    return [layer for layer in layers if id(layer) not in nested]


def _compiled_forward(forward: Callable, backend: str) -> Callable:
    compiled = torch.compile(forward, backend=backend)

    @functools.wraps(forward)
    def forward_with_dynamic_tokens(*args: Any, **kwargs: Any) -> Any:
        mark_token_dims_dynamic(args, kwargs)
        return compiled(*args, **kwargs)

    return forward_with_dynamic_tokens


def mark_token_dims_dynamic(args: tuple, kwargs: dict[str, Any]) -> None:
    """Mark as dynamic, for the next compile, the dimensions of a decoder layer's inputs that
    change with every packed micro-batch.

    A layer's first argument is its hidden states ``(B, T, H)``. Every dimension of size ``T``
    (past the first) of the tensor arguments is marked: the hidden states, position ids
    ``(B, T)``, rotary tables ``(B, T, D)``, a 4-D mask ``(B, 1, T, T)``. So are the sequence
    boundaries ``(S+1,)``. The marks are hints: a dimension that the graph needs static
    (say ``H``, were it equal to ``T``) is specialised instead.
    """
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return
    tokens = hidden.shape[1]
    for value in (*args, *kwargs.values()):
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(tensor, torch.Tensor):
                dims = [d for d in range(1, tensor.dim()) if tensor.shape[d] == tokens]
                if dims:
                    torch._dynamo.maybe_mark_dynamic(tensor, dims)
    for name in _BOUNDARY_KWARGS:
        boundaries = kwargs.get(name)
        if isinstance(boundaries, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(boundaries, 0)


__all__ = [
    "DEFAULT_BACKEND",
    "check_compile_backend",
    "compile_backends",
    "compile_decoder_layers",
    "mark_token_dims_dynamic",
]
