"""Triton backend of the fused linear log-probs / entropy (``impl="triton"``).

Same split as ``cross_entropy.py``: cuBLAS does the GEMMs on row chunks, Triton does the
row-wise work in fp32. Over s = (h·Wᵀ + b) / T, lse = logsumexp(s), p = softmax(s):
    logprob = s_y - lse                        (0 for rows labelled ignore_index)
    entropy = -Σ_j p_j log p_j                 (every row)
    ∂logprob/∂s_j = [j = y] - p_j
    ∂entropy/∂s_j = -p_j (s_j - Σ_k p_k s_k) = -p_j (log p_j - Σ_k p_k log p_k)
and ∂s/∂x = 1/T. The forward keeps only lse per row (N floats); the backward recomputes
each chunk's logits (one GEMM), overwrites them with the grad-logits, and runs the two
gradient GEMMs, so forward + backward costs 4 GEMMs and never holds more than one chunk.

Precision: the textbook forms lse - Σ p·s and s_j - Σ p·s subtract numbers of the size of
the logits to get an O(1) result, so fp32 rounding of the logits' scale (and of the saved
lse) lands in the entropy and its gradient. Both kernels therefore work with shifted
logits (s - m in the forward, s - lse in the backward) and renormalise, so that every
subtraction is of small numbers; see the comments in the kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from drift_engine.kernels._chunking import (
    LinearGrads,
    chunk_bounds,
    linear_logits,
    row_kernel_config,
    token_chunk_rows,
)
from drift_engine.kernels.labels import IGNORE_INDEX

__all__ = ["logprobs_forward", "logprobs_backward"]


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (R, V) input dtype, raw x = h·Wᵀ + b
    logits_row_stride,
    labels_ptr,  # (R,) int64
    logprob_ptr,  # (R,) fp32 out
    entropy_ptr,  # (R,) fp32 out (HAS_ENTROPY)
    lse_ptr,  # (R,) fp32 out
    n_cols,
    ignore_index,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride  # 64-bit: R·V may exceed 2^31
    cols = tl.arange(0, BLOCK_V)

    # One online sweep over the V blocks, with m the running max:
    #   running_sum = Σ e^(s-m)   and   running_dot = Σ e^(s-m)·(s-m)   (HAS_ENTROPY).
    # Then lse = m + log Σe and, with p = e^(s-m) / Σe and log p = (s-m) - log Σe,
    #   entropy = -Σ p log p = log Σe - running_dot / Σe,
    # a sum of two non-negative terms: unlike lse - Σ p·s it never cancels large numbers.
    # When m grows to m', e^(s-m)·(s-m) becomes e^(m-m')·e^(s-m)·((s-m) + (m-m')), so
    #   running_dot' = e^(m-m')·(running_dot + (m-m')·running_sum).
    running_max = -float("inf")
    running_sum = 0.0
    running_dot = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        s_masked = tl.where(mask, s, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(s_masked, axis=0))
        # m - m' <= 0. On the first block there is nothing to rescale (the sums are 0) and
        # m = -inf, so the shift is taken as 0 there rather than -inf (-inf·0 is NaN).
        shift = tl.where(running_sum > 0.0, running_max - new_max, 0.0)
        rescale = tl.exp(shift)
        e = tl.exp(s_masked - new_max)  # 0 on masked lanes
        if HAS_ENTROPY:
            running_dot = rescale * (running_dot + shift * running_sum) + tl.sum(
                tl.where(mask, e * (s - new_max), 0.0), axis=0
            )
        running_sum = running_sum * rescale + tl.sum(e, axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(running_sum) - running_dot / running_sum)

    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    s_target = tl.load(row_ptr + tl.where(ignored, 0, label)).to(tl.float32) * inv_temperature
    tl.store(logprob_ptr + row, tl.where(ignored, 0.0, s_target - lse))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (R, V) input dtype: raw logits in, grad wrt raw logits out
    logits_row_stride,
    labels_ptr,  # (R,) int64
    lse_ptr,  # (R,) fp32 from the forward
    grad_logprob_ptr,  # (R,) fp32 (HAS_GRAD_LOGPROB)
    grad_entropy_ptr,  # (R,) fp32 (HAS_GRAD_ENTROPY)
    n_cols,
    ignore_index,
    inv_temperature,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)

    grad_logprob = 0.0
    if HAS_GRAD_LOGPROB:
        grad_logprob = tl.load(grad_logprob_ptr + row)
        grad_logprob = tl.where(label == ignore_index, 0.0, grad_logprob)
    # With d_j = s_j - lse and q_j = e^(d_j): p_j = q_j / z with z = Σ_j q_j. z is 1 up to
    # the rounding of the saved fp32 lse (half an ulp of |lse|); dividing by it absorbs that
    # error, which the entropy gradient would otherwise amplify. The entropy factor
    #   s_j - Σ p s = log p_j - Σ_k p_k log p_k,   log p_j = d_j - log z,
    #   Σ_k p_k log p_k = (Σ_k q_k d_k) / z - log z,
    # is built from the small d's, never from the large s's. Without an entropy gradient
    # the extra sweep is skipped and p_j = q_j (z = 1): the log-prob gradient δ_jy - p_j has
    # no cancellation, so lse's rounding only costs a relative error of about one ulp.
    grad_entropy = 0.0
    z = 1.0  # Σ_j e^(s_j - lse)
    log_z = 0.0
    mean_log_p = 0.0  # Σ_k p_k log p_k = -entropy
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + row)
        z = 0.0
        sum_qd = 0.0  # Σ_k q_k d_k
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            d = s - lse
            q = tl.where(mask, tl.exp(d), 0.0)
            z += tl.sum(q, axis=0)
            sum_qd += tl.sum(tl.where(mask, q * d, 0.0), axis=0)
        log_z = tl.log(z)
        mean_log_p = sum_qd / z - log_z

    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        d = s - lse
        p = tl.exp(d) / z
        # grad_logprob·([j = y] - p_j), then 1/T below.
        grad = tl.where(offs == label, grad_logprob, 0.0) - p * grad_logprob
        if HAS_GRAD_ENTROPY:
            # + grad_entropy·(-p_j (log p_j - Σ_k p_k log p_k)).
            log_p = d - log_z
            grad -= grad_entropy * p * (log_p - mean_log_p)
        grad *= inv_temperature
        tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def logprobs_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(logprobs (N,) fp32, entropy (N,) fp32 or None, lse (N,) fp32)``; lse is of the
    tempered logits and is what ``logprobs_backward`` needs."""
    num_rows = hidden.shape[0]
    device = hidden.device
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(num_rows, dtype=torch.float32, device=device) if return_entropy else None
    rows = token_chunk_rows(num_rows, weight.shape[0], weight.element_size(), chunk_size)
    for start, end in chunk_bounds(num_rows, rows):
        logits = linear_logits(hidden[start:end], weight, bias)  # (C, V) raw, untempered
        block_v, num_warps = row_kernel_config(logits.shape[1])
        _logprobs_fwd_kernel[(end - start,)](
            logits,
            logits.stride(0),
            labels[start:end],
            logprobs[start:end],
            entropy[start:end] if entropy is not None else lse[start:end],
            lse[start:end],
            logits.shape[1],
            ignore_index,
            1.0 / float(temperature),
            HAS_ENTROPY=entropy is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        del logits
    return logprobs, entropy, lse


def logprobs_backward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    lse: torch.Tensor,  # (N,) fp32 from logprobs_forward
    grad_logprobs: torch.Tensor | None,  # (N,) upstream gradient of logprobs
    grad_entropy: torch.Tensor | None,  # (N,) upstream gradient of entropy
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``Σ grad_logprobs·logprobs + Σ grad_entropy·entropy`` w.r.t. hidden,
    weight and bias (None for a None bias), in their inputs' dtypes. Chunk logits are
    recomputed; grad of weight accumulates in fp32 when there are several chunks."""
    num_rows = hidden.shape[0]
    if grad_logprobs is None and grad_entropy is None:
        return (
            torch.zeros_like(hidden),
            torch.zeros_like(weight),
            torch.zeros_like(bias) if bias is not None else None,
        )
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
    rows = token_chunk_rows(num_rows, weight.shape[0], weight.element_size(), chunk_size)
    chunks = chunk_bounds(num_rows, rows)
    grads = LinearGrads(hidden, weight, bias, len(chunks))
    for start, end in chunks:
        logits = linear_logits(hidden[start:end], weight, bias)  # (C, V)
        block_v, num_warps = row_kernel_config(logits.shape[1])
        _logprobs_bwd_kernel[(end - start,)](
            logits,
            logits.stride(0),
            labels[start:end],
            lse[start:end],
            grad_logprobs[start:end] if grad_logprobs is not None else lse[start:end],
            grad_entropy[start:end] if grad_entropy is not None else lse[start:end],
            logits.shape[1],
            ignore_index,
            1.0 / float(temperature),
            HAS_GRAD_LOGPROB=grad_logprobs is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
        grads.add(start, end, logits)  # the kernel overwrote logits with grad-logits
        del logits
    return grads.result()
