"""Packed variable-length attention against a per-sequence reference written out query by query."""

import pytest
import torch

import drift_engine.attention.varlen as varlen_module
from drift_engine.attention import (
    ATTENTION_NAME,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    register_varlen_attention,
    select_backend,
    varlen_attention,
    varlen_attention_forward,
    varlen_attention_mask,
)
from drift_engine.errors import ConfigError

LENGTHS = [1, 7, 13, 4]  # awkward sizes, a length-1 sequence included


def reference_attention(q, k, v, lengths, *, scale, causal=True, window=None, softcap=None):
    """Per sequence, per query: softmax over the keys it may see. q (T, Hq, D), k/v (T, Hkv, D)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    start = 0
    for length in lengths:
        for i in range(length):
            visible = []
            for j in range(length):
                if causal and j > i:
                    continue
                if window is not None and abs(i - j) >= window:
                    continue
                visible.append(start + j)
            for h in range(q.shape[1]):
                keys = k[visible, h // groups]  # (n, D)
                scores = keys @ q[start + i, h] * scale  # (n,)
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                out[start + i, h] = torch.softmax(scores, 0) @ v[visible, h // groups]
        start += length
    return out


def packed_inputs(num_heads=4, num_kv_heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q = torch.randn(total, num_heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, cu_seqlens_from_lengths(torch.tensor(LENGTHS)), max(LENGTHS)


# Block bounds of the sdpa fallback: one call per sequence, a mix, the whole pack in one block.
BLOCK_TOKENS = pytest.mark.parametrize(
    "block_tokens", [1, 8, 1024], ids=["per_sequence", "blocks_of_8", "one_block"]
)


@BLOCK_TOKENS
@pytest.mark.parametrize(
    "causal, window, softcap",
    [
        (True, None, None),
        (True, 3, None),
        (True, None, 2.0),
        (True, 5, 1.5),
        (False, None, None),
        (False, 2, None),
    ],
)
def test_sdpa_backend_matches_reference(monkeypatch, block_tokens, causal, window, softcap):
    monkeypatch.setattr(varlen_module, "_BLOCK_TOKENS", block_tokens)
    q, k, v, cu, max_len = packed_inputs()
    scale = 0.3
    out = varlen_attention(
        q,
        k,
        v,
        cu,
        max_len,
        scale=scale,
        causal=causal,
        sliding_window=window,
        softcap=softcap,
        backend="sdpa",
    )
    ref = reference_attention(
        q, k, v, LENGTHS, scale=scale, causal=causal, window=window, softcap=softcap
    )
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@BLOCK_TOKENS
def test_sdpa_backend_gradients(monkeypatch, block_tokens):
    monkeypatch.setattr(varlen_module, "_BLOCK_TOKENS", block_tokens)
    q, k, v, cu, max_len = packed_inputs(seed=1)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    grads = []
    for fn in (
        lambda a, b, c: varlen_attention(a, b, c, cu, max_len, sliding_window=4, backend="sdpa"),
        lambda a, b, c: reference_attention(a, b, c, LENGTHS, scale=8**-0.5, window=4),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * grad_out).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# Blocks of at most 8 tokens: [3, 5] fills one exactly, the empty sequence is dropped, 9 is
# longer than a block, [2, 2] stops short of the 6 that follows.
BLOCKED_LENGTHS = [3, 5, 1, 0, 9, 2, 2, 6, 1]
BLOCKS_OF_8 = [[3, 5], [1], [9], [2, 2], [6, 1]]


@pytest.mark.parametrize(
    "causal, window, softcap", [(True, None, None), (True, 4, 2.0), (False, 3, None)]
)
def test_sdpa_blocks_match_reference(monkeypatch, causal, window, softcap):
    monkeypatch.setattr(varlen_module, "_BLOCK_TOKENS", 8)
    cu = cu_seqlens_from_lengths(torch.tensor(BLOCKED_LENGTHS))
    assert varlen_module._sequence_blocks(cu.tolist(), 8) == BLOCKS_OF_8
    g = torch.Generator().manual_seed(6)
    total = sum(BLOCKED_LENGTHS)
    q, k, v = (torch.randn(total, h, 8, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    grad_out = torch.randn(total, 6, 8, generator=g, dtype=torch.float64)
    results = []
    for fn in (
        lambda a, b, c: varlen_attention(
            a,
            b,
            c,
            cu,
            9,
            scale=0.4,
            causal=causal,
            sliding_window=window,
            softcap=softcap,
            backend="sdpa",
        ),
        lambda a, b, c: reference_attention(
            a, b, c, BLOCKED_LENGTHS, scale=0.4, causal=causal, window=window, softcap=softcap
        ),
    ):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * grad_out).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_boundaries_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 0, 1, 2, 3, 4]])
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    # Row starts always begin a sequence; so does any position that does not continue.
    assert cu.tolist() == [0, 3, 5, 6, 8, 11, 16]
    assert cu.dtype == torch.int32 and max_len == 5


class _Attention(torch.nn.Module):
    """What transformers passes as `module`: GQA groups and causality."""

    def __init__(self, sliding_window=None):
        super().__init__()
        self.is_causal = True
        self.sliding_window = sliding_window


def _to_hf_layout(t):  # (T, H, D) -> (1, H, T, D)
    return t.transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids"])
def test_transformers_forward_packed(source):
    q, k, v, cu, max_len = packed_inputs(seed=2)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    kwargs = {"position_ids": position_ids}
    if source == "cu_seq_lens":
        # Deliberately contradictory position ids: the explicit boundaries win.
        kwargs = {
            "position_ids": torch.arange(q.shape[0]).unsqueeze(0),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
    out, weights = varlen_attention_forward(
        _Attention(sliding_window=3),
        _to_hf_layout(q),
        _to_hf_layout(k),
        _to_hf_layout(v),
        None,
        scaling=0.25,
        **kwargs,
    )
    assert weights is None and out.shape == (1, q.shape[0], q.shape[1], v.shape[-1])
    ref = reference_attention(q, k, v, LENGTHS, scale=0.25, window=3)
    torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)


def test_transformers_forward_padding_mask():
    """Left- and right-padded rows: real tokens attend among themselves, padding outputs 0."""
    g = torch.Generator().manual_seed(3)
    rows, length, heads, dim = 3, 6, 2, 4
    q, k, v = (
        torch.randn(rows, heads, length, dim, generator=g, dtype=torch.float64) for _ in range(3)
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out, _ = varlen_attention_forward(_Attention(), q, k, v, mask)  # (B, L, H, D)
    for b in range(rows):
        real = mask[b].bool()
        n = int(real.sum())
        ref = reference_attention(
            q[b].transpose(0, 1)[real],
            k[b].transpose(0, 1)[real],
            v[b].transpose(0, 1)[real],
            [n],
            scale=dim**-0.5,
        )
        torch.testing.assert_close(out[b][real], ref, rtol=1e-12, atol=1e-12)
        assert (out[b][~real] == 0).all()


def test_transformers_forward_decoding_uses_last_keys():
    """A KV cache makes the query shorter than the keys: the query sits at the end."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    out, _ = varlen_attention_forward(_Attention(), q, k, v, None, softcap=3.0)
    full_q = torch.cat([torch.zeros(1, 4, 3, 8, dtype=torch.float64), q], dim=2)
    ref = reference_attention(
        full_q[0].transpose(0, 1),
        k[0].transpose(0, 1),
        v[0].transpose(0, 1),
        [5],
        scale=8**-0.5,
        softcap=3.0,
    )[3:]
    torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)


def test_mask_function_builds_no_dense_mask_for_training():
    mask_kwargs = dict(
        batch_size=1,
        q_length=4096,
        kv_length=4096,
        q_offset=0,
        kv_offset=0,
        attention_mask=None,
        allow_is_causal_skip=True,
        device="cpu",
    )
    assert varlen_attention_mask(**mask_kwargs) is None
    padding = torch.tensor([[True, True, False]])
    kept = varlen_attention_mask(
        **{**mask_kwargs, "q_length": 3, "kv_length": 3, "attention_mask": padding}
    )
    assert kept.shape == (1, 3)
    # Decoding (query after a cached prefix): a materialised boolean 4-D mask.
    dense = varlen_attention_mask(**{**mask_kwargs, "q_length": 1, "kv_length": 3, "q_offset": 2})
    assert dense.shape == (1, 1, 1, 3) and dense.dtype == torch.bool and dense.all()


def test_registration_is_idempotent_and_checks_backend():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert register_varlen_attention() == ATTENTION_NAME
    assert register_varlen_attention() == ATTENTION_NAME
    assert AttentionInterface._global_mapping[ATTENTION_NAME] is varlen_attention_forward
    assert AttentionMaskInterface._global_mapping[ATTENTION_NAME] is varlen_attention_mask
    with pytest.raises(ConfigError, match="unknown attention backend"):
        register_varlen_attention("cutlass")


def test_input_errors():
    q, k, v, cu, max_len = packed_inputs(num_heads=3, num_kv_heads=2)
    with pytest.raises(ConfigError, match="multiple of the key/value heads"):
        varlen_attention(q, k, v, cu, max_len)
    q, k, v, cu, max_len = packed_inputs()
    with pytest.raises(ConfigError, match="sliding_window"):
        varlen_attention(q, k, v, cu, max_len, sliding_window=0)
    with pytest.raises(ConfigError, match="softcap"):
        varlen_attention(q, k, v, cu, max_len, softcap=1.0, backend="torch")


def test_cpu_selects_exact_fallback():
    q, k, *_ = packed_inputs()
    assert select_backend(q.half(), k.half()) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_match_fallback(window, dtype):
    """Each CUDA backend against the exact fallback, within 2x SDPA's own error in that dtype."""
    from drift_engine.attention import available_backends

    g = torch.Generator().manual_seed(5)
    lengths = [97, 1, 257, 33, 130]
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 64, generator=g, dtype=torch.float64) for h in (8, 2, 2))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths)).cuda()
    truth = varlen_attention(
        q.cuda(), k.cuda(), v.cuda(), cu, max(lengths), sliding_window=window, backend="sdpa"
    )
    low = [t.to("cuda", dtype) for t in (q, k, v)]
    fallback = varlen_attention(*low, cu, max(lengths), sliding_window=window, backend="sdpa")
    budget = 2 * (fallback.double() - truth).abs().max().item() + 1e-3
    for backend in available_backends():
        if backend == "sdpa":
            continue
        out = varlen_attention(*low, cu, max(lengths), sliding_window=window, backend=backend)
        err = (out.double() - truth).abs().max().item()
        assert err <= budget, f"{backend}: error {err:.3g} > {budget:.3g}"


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v, cu, max_len = packed_inputs()
    q, k, v = q.float(), k.float(), v.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, cu, max_len)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.double(), k.double(), v.double(), LENGTHS, scale=8**-0.5)
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)
