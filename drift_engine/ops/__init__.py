"""Fused linear losses: options, validation, custom ops, autograd and the functional API.

    from drift_engine.ops import fused_linear_cross_entropy, fused_linear_logprobs

Layers, each calling only the ones below it:

    functional.py   fused_linear_cross_entropy / fused_linear_logprobs: build the options
    autograd.py     validate, one autograd Function per op, calling the custom ops
    library.py      torch.library custom ops with fake implementations (eager and compile)
    backends.py     resolve ``impl`` and run the backend: torch_impl.py (chunked PyTorch)
                    or the Triton launchers of drift_engine.kernels
    options.py      the frozen options dataclasses; validation.py the input checks

``impl="torch"`` runs the chunked PyTorch backend, ``impl="triton"`` the Triton kernels,
``impl="auto"`` Triton on CUDA. reference.py holds the dense float64 reference.
"""

from drift_engine.ops.autograd import LogProbs
from drift_engine.ops.functional import fused_linear_cross_entropy, fused_linear_logprobs
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions
from drift_engine.ops.validation import FusedOpError

__all__ = [
    "CrossEntropyOptions",
    "FusedOpError",
    "LogProbOptions",
    "LogProbs",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
]
