"""drift-engine: fast, exact DRIFT (offline multi-turn rollouts + importance-weighted SFT).

The fused losses are importable from the top level::

    from drift_engine import fused_linear_cross_entropy, fused_linear_logprobs

Heavy submodules (training, rollout, models) are imported lazily so that
``import drift_engine`` stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fused_linear_cross_entropy": "drift_engine.ops",
    "fused_linear_logprobs": "drift_engine.ops",
    "LogProbs": "drift_engine.ops",
    "FusedLinearCrossEntropy": "drift_engine.nn",
    "FusedLinearLogProbs": "drift_engine.nn",
    "DriftError": "drift_engine.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'drift_engine' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
