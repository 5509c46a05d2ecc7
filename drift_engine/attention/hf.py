"""The ``"drift_varlen"`` attention implementation for Hugging Face transformers models.

After :func:`register_varlen_attention`, any model whose attention modules dispatch through
transformers' ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma 2/3, ...) runs packed
rows with ``attn_implementation="drift_varlen"``::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="drift_varlen")
    model.model(input_ids=ids,                  # (1, T): trajectories concatenated
                position_ids=pos,               # (1, T): restarting at 0 per trajectory
                cu_seq_lens_q=cu, cu_seq_lens_k=cu,   # (B+1,) int32
                max_length_q=m, max_length_k=m)

Where sequence boundaries come from, in order:

1. ``cu_seq_lens_q`` / ``max_length_q`` (transformers' flash-attention keyword arguments, which
   the decoder layers forward to attention): no host sync, no derivation. This is what
   :func:`drift_engine.models.model_hidden_states` passes.
2. A 2-D padding mask ``(B, L)``: each row's unmasked tokens are one sequence (left or right
   padding); padded positions output zeros.
3. ``position_ids``: a sequence starts at each row start and wherever the position does not
   continue the previous token's (a restart at 0). Derived once per forward (one host sync),
   then reused by every layer.
4. Nothing: each row is one sequence.

The matching mask function keeps transformers from building a dense ``(T, T)`` mask: it
returns None (or the 2-D padding mask) for training and prefill. When a KV cache makes the
query shorter than the keys (decoding), it returns transformers' boolean SDPA mask and
attention runs densely on it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from drift_engine.attention.varlen import (
    BACKENDS,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    dense_attention,
    varlen_attention,
)
from drift_engine.errors import ConfigError

ATTENTION_NAME = "drift_varlen"

_backend = "auto"


def register_varlen_attention(backend: str = "auto") -> str:
    """Register ``"drift_varlen"`` with transformers (idempotent); returns the name.

    ``backend`` chooses the kernel for every later call: ``"auto"`` (flash-attn, then PyTorch's
    varlen kernel, then SDPA), or one of ``"flash_attn"``, ``"torch"``, ``"sdpa"``.
    """
    global _backend
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _backend = backend
    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_attention_mask)
    return ATTENTION_NAME


class _PerForwardCache:
    """Boundaries derived from a tensor (position ids or padding mask), reused across layers.

    Keyed by the tensor's identity and version counter: every layer of a forward (and the
    recomputation under gradient checkpointing) receives the same tensor object. Two entries,
    because models with sliding-window layers alternate between two masks.
    """

    _SIZE = 2

    def __init__(self) -> None:
        self._entries: list[tuple[weakref.ref, int, Any]] = []

    def get(self, source: torch.Tensor) -> Any:
        if source.is_inference():  # no version counter: never cached
            return None
        for ref, version, value in self._entries:
            if ref() is source and source._version == version:
                return value
        return None

    def put(self, source: torch.Tensor, value: Any) -> Any:
        if not source.is_inference():
            self._entries = [(weakref.ref(source), source._version, value)] + self._entries[
                : self._SIZE - 1
            ]
        return value


_from_position_ids = _PerForwardCache()
_from_padding_mask = _PerForwardCache()


def _boundaries(
    batch: int,
    length: int,
    device: torch.device,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(cu_seqlens (S+1,) int32, max_seqlen, kept token indices (N,) into B*L or None)."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        cu_seqlens = kwargs.get("cu_seq_lens_k")
    if cu_seqlens is not None:
        max_seqlen = kwargs.get("max_length_q") or kwargs.get("max_length_k")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cu_seqlens.to(device=device, dtype=torch.int32), int(max_seqlen), None

    if attention_mask is not None:
        cached = _from_padding_mask.get(attention_mask)
        if cached is None:
            keep = attention_mask[:, -length:].to(device=device, dtype=torch.bool)  # (B, L)
            lengths = keep.sum(dim=1)  # (B,)
            token_index = keep.reshape(-1).nonzero().squeeze(1)  # (N,)
            cached = _from_padding_mask.put(
                attention_mask, (cu_seqlens_from_lengths(lengths), int(lengths.max()), token_index)
            )
        return cached

    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] == length:
        cached = _from_position_ids.get(position_ids)
        if cached is None:
            rows = position_ids.reshape(-1, length).expand(batch, length)
            cu, max_seqlen = cu_seqlens_from_position_ids(rows.to(device))
            cached = _from_position_ids.put(position_ids, (cu, max_seqlen, None))
        return cached

    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return cu, length, None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, Hq, L, D)
    key: torch.Tensor,  # (B, Hkv, S, D)
    value: torch.Tensor,  # (B, Hkv, S, D)
    attention_mask: torch.Tensor | None,  # None, (B, S) padding mask, or (B, 1, L, S)
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # ((B, L, Hq, D), no attention weights)
    """transformers attention function: packed varlen attention, dense only when decoding."""
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    batch, num_heads, length, head_dim = query.shape

    if (attention_mask is not None and attention_mask.dim() == 4) or key.shape[2] != length:
        # Decoding with a KV cache: the mask function returned transformers' (B, 1, L, S) mask.
        out = dense_attention(
            query,
            key,
            value,
            attention_mask,
            scale=scaling,
            causal=is_causal,
            softcap=softcap,
            dropout=dropout,
        )  # (B, Hq, L, D)
        return out.transpose(1, 2).contiguous(), None

    cu_seqlens, max_seqlen, token_index = _boundaries(
        batch, length, query.device, attention_mask, kwargs
    )
    # (B, H, L, D) -> (B*L, H, D): the packed layout of the varlen kernels.
    q = query.transpose(1, 2).reshape(batch * length, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], value.shape[-1])
    if token_index is not None:
        q, k, v = q[token_index], k[token_index], v[token_index]  # (N, H, D)

    out = varlen_attention(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        scale=scaling,
        causal=is_causal,
        sliding_window=sliding_window,
        softcap=softcap,
        dropout=dropout,
        backend=_backend,
    )  # (N, Hq, Dv)

    if token_index is not None:
        padded = out.new_zeros(batch * length, num_heads, out.shape[-1])
        out = padded.index_copy(0, token_index, out)
    return out.view(batch, length, num_heads, out.shape[-1]), None


def varlen_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers mask function for ``"drift_varlen"``: no dense mask unless decoding.

    Called with transformers' mask keyword arguments (``q_length``, ``kv_length``,
    ``q_offset``, ``attention_mask``, ...; older releases pass ``cache_position`` instead of
    ``q_length``).
    """
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:
        q_length = kwargs["cache_position"].shape[0]
    kv_length = kwargs.get("kv_length")
    q_offset = kwargs.get("q_offset", 0)
    no_cached_prefix = isinstance(q_offset, int) and q_offset == 0 and q_length == kv_length
    if no_cached_prefix:
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            return None
        attention_mask = attention_mask[:, -kv_length:]  # (B, S)
        return None if attention_mask.all() else attention_mask

    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # dense_attention needs the mask materialised
    return sdpa_mask(*args, **kwargs)
