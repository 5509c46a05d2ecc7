"""Variable-length causal attention over packed trajectories.

``varlen_attention`` is the plain-tensor function (packed ``(T, H, D)`` inputs and
``cu_seqlens``); ``register_varlen_attention`` makes it available to any Hugging Face model
as ``attn_implementation="drift_varlen"``.
"""

from drift_engine.attention.hf import (
    ATTENTION_NAME,
    register_varlen_attention,
    varlen_attention_forward,
    varlen_attention_mask,
)
from drift_engine.attention.varlen import (
    BACKENDS,
    available_backends,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    dense_attention,
    select_backend,
    varlen_attention,
)

__all__ = [
    "ATTENTION_NAME",
    "BACKENDS",
    "available_backends",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "dense_attention",
    "register_varlen_attention",
    "select_backend",
    "varlen_attention",
    "varlen_attention_forward",
    "varlen_attention_mask",
]
