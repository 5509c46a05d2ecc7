"""Variable-length attention over packed sequences.

All sequences of a micro-batch are concatenated along the token axis, without padding:
``query (T, Hq, D)``, ``key``/``value`` ``(T, Hkv, D)``, and ``cu_seqlens (B+1,)`` int32
holds the boundaries (sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``). A token
attends only to tokens of its own sequence.

Backends, picked per call by :func:`select_backend` (or forced with ``backend=``):

``"flash_attn"``
    ``flash_attn.flash_attn_varlen_func`` when flash-attn is installed, on CUDA, fp16/bf16.
    Supports GQA, sliding windows, softcap and dropout.
``"torch"``
    ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own flash kernel), on CUDA, fp16/bf16.
    Its keywords differ between releases and are feature-detected (``window_size`` or
    ``is_causal``; ``scale``; ``enable_gqa``). No softcap, no dropout.
``"sdpa"``
    The exact fallback on any device and dtype: consecutive sequences are grouped into blocks
    of at most ``_BLOCK_TOKENS`` tokens (a longer sequence is a block of its own), one
    ``scaled_dot_product_attention`` call per block with a block-diagonal mask, so the cost is
    O(sum of L_i^2), not O(T^2). Softcap is computed explicitly (same arithmetic as the
    models' eager attention).

Sliding windows follow transformers' convention: with window ``W`` a query at position ``i``
sees keys ``j`` with ``i - W < j <= i`` (``W`` keys including itself), i.e. flash-attn's
``window_size=(W - 1, 0)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from drift_engine.errors import ConfigError

BACKENDS = ("auto", "flash_attn", "torch", "sdpa")

# The fallback groups consecutive sequences into blocks of at most this many tokens and runs
# one SDPA call per block. A call costs a fixed ~0.3 ms (forward + backward, CPU) on top of
# its (n, n) scores, masked-out ones included: merging two short sequences saves a call for a
# little masked work, merging long ones wastes more than it saves. 128 was at or near the
# fastest bound measured on CPU for packs of 1k-4k tokens with median lengths of 32-256.
_BLOCK_TOKENS = 128

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# Kernel lookups are done once, eagerly, and kept in a plain dict rather than an lru_cache:
# torch.compile traces through lru_cache wrappers, and a traced import of a missing package
# or inspect.signature breaks the graph, while a filled dict is read as a constant.
_lookups: dict[str, Any] = {}


def _cached(name: str, find: Callable[[], Any]) -> Any:
    if name not in _lookups:
        _lookups[name] = find()
    return _lookups[name]


def _find_flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _find_torch_varlen() -> tuple[Callable, tuple[str, ...]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, tuple(inspect.signature(varlen_attn).parameters)


def _flash_attn_varlen_func() -> Callable | None:
    return _cached("flash_attn", _find_flash_attn)


def _flash_attn_supports_softcap() -> bool:
    def find() -> bool:
        fn = _flash_attn_varlen_func()
        return fn is not None and "softcap" in inspect.signature(fn).parameters

    return _cached("flash_attn_softcap", find)


def _torch_varlen_attn() -> tuple[Callable, tuple[str, ...]] | None:
    """PyTorch's varlen attention and the names of its parameters, or None if absent."""
    return _cached("torch_varlen", _find_torch_varlen)


def probe_kernels() -> None:
    """Look up the varlen kernels now. Call it before compiling code that runs attention,
    so that the compiled code only reads the results (see ``_lookups``)."""
    _flash_attn_varlen_func()
    _flash_attn_supports_softcap()
    _torch_varlen_attn()


def available_backends() -> list[str]:
    """Backends usable in this environment (``"sdpa"`` always; kernels need CUDA)."""
    found = ["sdpa"]
    if torch.cuda.is_available():
        if _torch_varlen_attn() is not None:
            found.insert(0, "torch")
        if _flash_attn_varlen_func() is not None:
            found.insert(0, "flash_attn")
    return found


def _kernel_eligible(query: torch.Tensor, key: torch.Tensor) -> bool:
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in _KERNEL_DTYPES
        and key.shape[-1] == head_dim
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def select_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> str:
    """The fastest backend that computes this call exactly: flash_attn, then torch, then sdpa."""
    if _kernel_eligible(query, key):
        if _flash_attn_varlen_func() is not None and (
            softcap is None or _flash_attn_supports_softcap()
        ):
            return "flash_attn"
        torch_varlen = _torch_varlen_attn()
        if torch_varlen is not None and softcap is None and dropout == 0.0:
            params = torch_varlen[1]
            if sliding_window is None or "window_size" in params:
                return "torch"
    return "sdpa"


def _window_size(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """flash-attn's (left, right) window: -1 is unbounded."""
    if sliding_window is None:
        return (-1, 0) if causal else (-1, -1)
    left = sliding_window - 1
    return (left, 0) if causal else (left, left)


def varlen_attention(
    query: torch.Tensor,  # (T, Hq, D)
    key: torch.Tensor,  # (T, Hkv, D)
    value: torch.Tensor,  # (T, Hkv, D)
    cu_seqlens: torch.Tensor,  # (B+1,) int32, cu_seqlens[-1] == T
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:  # (T, Hq, D)
    """Attention of packed sequences, each attending only to itself.

    ``scale`` defaults to ``1/sqrt(D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA);
    ``softcap`` applies ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2).
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ConfigError(
            f"query has {num_heads} heads and key/value {num_kv_heads}: the query heads must be a "
            "multiple of the key/value heads (grouped-query attention)"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ConfigError(
            f"sliding_window must be a positive number of tokens, got {sliding_window}"
        )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast, SDPA runs in the autocast dtype; so do the kernels (which are not
        # autocast-aware, and rotary embeddings hand them fp32 queries and keys).
        compute_dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(compute_dtype) for t in (query, key, value))
    if backend == "auto":
        backend = select_backend(
            query, key, sliding_window=sliding_window, softcap=softcap, dropout=dropout
        )
    if backend == "flash_attn":
        return _flash_attn(
            query,
            key,
            value,
            cu_seqlens,
            max_seqlen,
            scale,
            causal,
            sliding_window,
            softcap,
            dropout,
        )
    if backend == "torch":
        if softcap is not None or dropout != 0.0:
            raise ConfigError(
                "the 'torch' varlen backend supports neither softcap nor attention dropout; "
                "use backend='auto' or 'sdpa'"
            )
        return _torch_varlen(
            query, key, value, cu_seqlens, max_seqlen, scale, causal, sliding_window
        )
    if backend == "sdpa":
        return _sdpa_varlen(
            query, key, value, cu_seqlens, scale, causal, sliding_window, softcap, dropout
        )
    raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _flash_attn(
    query, key, value, cu_seqlens, max_seqlen, scale, causal, sliding_window, softcap, dropout
):
    fn = _flash_attn_varlen_func()
    if fn is None:
        raise ConfigError(
            "backend 'flash_attn' needs the flash-attn package: pip install flash-attn"
        )
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    kwargs = {}
    if softcap is not None:
        if not _flash_attn_supports_softcap():
            raise ConfigError("the installed flash-attn has no softcap; upgrade it to >= 2.6")
        kwargs["softcap"] = float(softcap)
    return fn(
        query,
        key,
        value,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=causal,
        window_size=_window_size(causal, sliding_window),
        **kwargs,
    )


def _torch_varlen(query, key, value, cu_seqlens, max_seqlen, scale, causal, sliding_window):
    found = _torch_varlen_attn()
    if found is None:
        raise ConfigError(
            "backend 'torch' needs torch.nn.attention.varlen (PyTorch >= 2.10); upgrade torch or "
            "use backend='sdpa'"
        )
    varlen_attn, params = found
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    kwargs = {}
    if "window_size" in params:
        # torch reads exactly (-1, 0) as "causal": pass a tuple, not a list.
        kwargs["window_size"] = _window_size(causal, sliding_window)
    else:
        if sliding_window is not None:
            raise ConfigError(
                "this torch's varlen_attn has no sliding window; upgrade torch or use backend='sdpa'"
            )
        kwargs["is_causal"] = causal
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        # The kernel scales by 1/sqrt(D); fold the difference into the query.
        query = query * (scale * math.sqrt(query.shape[-1]))
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = _repeat_kv(key, value, query.shape[1] // key.shape[1])
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _repeat_kv(
    key: torch.Tensor, value: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads on dim 1, ``(T, Hkv, D)`` or ``(B, Hkv, L, D)``: Hkv -> Hkv * groups, each
    key/value head shared by ``groups`` query heads."""
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _allowed_positions(
    query_pos: torch.Tensor,  # (Lq,)
    key_pos: torch.Tensor,  # (Lk,)
    causal: bool,
    sliding_window: int | None,
) -> torch.Tensor | None:  # (Lq, Lk) bool, True = attend; None = everything allowed
    distance = query_pos[:, None] - key_pos[None, :]  # (Lq, Lk)
    allowed = None
    if causal:
        allowed = distance >= 0
    if sliding_window is not None:
        in_window = distance < sliding_window if causal else distance.abs() < sliding_window
        allowed = in_window if allowed is None else allowed & in_window
    return allowed


def _sequence_blocks(bounds: list[int], block_tokens: int) -> list[list[int]]:
    """Lengths of the sequences in each block: consecutive sequences, greedily, while the block
    stays within ``block_tokens``; a longer sequence is a block on its own. Empty sequences
    are dropped."""
    blocks: list[list[int]] = []
    block_len = block_tokens  # forces a new block for the first sequence
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length == 0:
            continue
        if block_len + length > block_tokens:
            blocks.append([])
            block_len = 0
        blocks[-1].append(length)
        block_len += length
    return blocks


# Under torch.compile this runs eagerly (a graph break): traced, its host-side loop would
# specialise the graph on each micro-batch's sequence boundaries and recompile every step.
@torch.compiler.disable
def _sdpa_varlen(query, key, value, cu_seqlens, scale, causal, sliding_window, softcap, dropout):
    key, value = _repeat_kv(key, value, query.shape[1] // key.shape[1])
    # One host read of the boundaries (a sync on CUDA, where this fallback only runs when no
    # varlen kernel applies).
    blocks = _sequence_blocks(cu_seqlens.tolist(), _BLOCK_TOKENS)
    if not blocks:
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    sizes = [sum(lengths) for lengths in blocks]
    # (T, H, D) -> (H, T, D) -> per block (H, n, D). split, not slicing: its backward
    # concatenates the block gradients once instead of adding a (T, H, D) zero-padded
    # gradient per block.
    query_blocks, key_blocks, value_blocks = (
        t.transpose(0, 1).split(sizes, dim=1) for t in (query, key, value)
    )
    outputs = []
    for lengths, q, k, v in zip(blocks, query_blocks, key_blocks, value_blocks, strict=True):
        mask = _block_mask(lengths, causal, sliding_window, q.device)
        outputs.append(
            _masked_attention(
                q, k, v, mask, causal if mask is None else None, scale, softcap, dropout
            )
        )  # (Hq, n, D)
    return torch.cat(outputs, dim=1).transpose(0, 1)  # (T, Hq, D)


def _block_mask(
    lengths: list[int], causal: bool, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:  # (n, n) bool, True = attend, n = sum(lengths); None = plain (causal)
    """Which keys each query of a block may see: its own sequence, causal and windowed."""
    total = sum(lengths)
    window_matters = sliding_window is not None and sliding_window < max(lengths)
    if len(lengths) == 1 and not window_matters:
        return None  # SDPA's own is_causal (or no mask) covers it
    positions = torch.arange(total, device=device)  # (n,)
    allowed = _allowed_positions(positions, positions, causal, sliding_window)
    if len(lengths) > 1:
        sequence_of = torch.repeat_interleave(
            torch.arange(len(lengths), device=device),
            torch.tensor(lengths, device=device),
            output_size=total,
        )  # (n,)
        same_sequence = sequence_of[:, None] == sequence_of[None, :]  # (n, n)
        allowed = same_sequence if allowed is None else allowed & same_sequence
    return allowed


def _masked_attention(
    query: torch.Tensor,  # (..., Hq, Lq, D)
    key: torch.Tensor,  # (..., Hq, Lk, D)
    value: torch.Tensor,  # (..., Hq, Lk, D)
    mask: torch.Tensor
    | None,  # broadcastable to (..., Hq, Lq, Lk): bool (True = attend) or additive
    is_causal: bool | None,  # only when mask is None: causal aligned to the last key
    scale: float,
    softcap: float | None,
    dropout: float,
) -> torch.Tensor:  # (..., Hq, Lq, D)
    """Dense attention: SDPA, or explicit math when the scores are soft-capped."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None and is_causal and q_len != k_len:
        # SDPA's is_causal aligns to the first key; a decoding query is aligned to the last one.
        mask = _allowed_positions(
            torch.arange(k_len - q_len, k_len, device=query.device),
            torch.arange(k_len, device=query.device),
            True,
            None,
        )
        is_causal = False
    if softcap is None:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=bool(is_causal) and mask is None,
            scale=scale,
        )
    if mask is None and is_causal:
        mask = _allowed_positions(
            torch.arange(q_len, device=query.device),
            torch.arange(k_len, device=query.device),
            True,
            None,
        )
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (..., Hq, Lq, Lk)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # Softmax in (at least) fp32, as the models' eager attention does.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, value)


def dense_attention(
    query: torch.Tensor,  # (B, Hq, Lq, D)
    key: torch.Tensor,  # (B, Hkv, Lk, D)
    value: torch.Tensor,  # (B, Hkv, Lk, D)
    mask: torch.Tensor | None,  # (B, 1, Lq, Lk) bool (True = attend) or additive float
    *,
    scale: float | None = None,
    causal: bool = True,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:  # (B, Hq, Lq, D)
    """Padded attention with an explicit 4-D mask (decoding with a KV cache).

    Without a mask, a causal query block is aligned to the end of the keys (the cached
    prefix precedes it).
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    key, value = _repeat_kv(key, value, query.shape[1] // key.shape[1])
    return _masked_attention(
        query, key, value, mask, causal if mask is None else None, scale, softcap, dropout
    )


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) sequence lengths -> (B+1,) int32 cumulative boundaries starting at 0."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of packed rows from their position ids.

    ``position_ids (B, L)``: a sequence starts at each row start and wherever the position
    does not continue the previous one (normally a restart at 0). Returns ``cu_seqlens``
    ``(S+1,)`` int32 over the flattened ``B*L`` tokens and the longest length (a host sync).
    """
    rows, length = position_ids.shape
    flat = position_ids.reshape(-1)  # (B*L,)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True
    start_index = starts.nonzero().squeeze(1)  # (S,)
    cu = torch.empty(start_index.numel() + 1, dtype=torch.int32, device=flat.device)
    cu[:-1] = start_index
    cu[-1] = rows * length
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return cu, max_seqlen
