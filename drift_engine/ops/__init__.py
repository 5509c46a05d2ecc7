"""Fused linear losses: the functional API, autograd Functions and both backends' glue.

    from drift_engine.ops import fused_linear_cross_entropy, fused_linear_logprobs

``impl="torch"`` runs the chunked PyTorch backend (drift_engine.ops.torch_impl),
``impl="triton"`` the kernels of drift_engine.kernels, ``impl="auto"`` Triton on CUDA.
"""

from drift_engine.ops.cross_entropy import fused_linear_cross_entropy
from drift_engine.ops.logprobs import LogProbs, fused_linear_logprobs
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
