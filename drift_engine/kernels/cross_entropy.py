"""Triton backend of the fused linear cross-entropy (``impl="triton"``).

The three large GEMMs of the loss (logits = h·Wᵀ, grad_h = g·W, grad_W = gᵀ·h) run on
cuBLAS through ``torch.mm``; one Triton kernel per logits block does all the row-wise work
in fp32: softcap, an online (max, sum-exp) sweep for the log-sum-exp, the target logit,
the smoothing sum, the loss, and a second sweep that overwrites the logits in place with
the gradient of ``Σ_i row_coef[i]·loss[i]`` with respect to them. The logits buffer is the
only large temporary.

Two schedules walk the (N, V) logits (docs/kernels.md has the FLOP and memory accounting):

* ``token_chunks``: chunks of rows over the full vocabulary; 3 GEMMs; grad of weight is
  one GEMM when a single chunk covers all rows, otherwise it accumulates in fp32.
* ``vocab_slabs``: the log-sum-exp (and loss) over row chunks first, then each vocabulary
  slab of all rows once: grad of weight is written once per slab, grad of hidden
  accumulates in fp32; 4 GEMMs, peak ≈ the gradient buffers, the fp32 grad_hidden
  accumulator and one slab (by default sized like grad_hidden, within 16–128 MiB).

Per row, with s = softcap(x) = cap·tanh(x/cap), lse = logsumexp(s), ε = label_smoothing,
z = z_loss:
    loss   = (1-ε)(lse - s_y) + ε(lse - mean_j s_j) + z·lse²
    ∂loss/∂s_j = p_j(1 + 2z·lse) - (1-ε)·[j = y] - ε/V,     p = softmax(s)
    ∂loss/∂x_j = ∂loss/∂s_j · (1 - (s_j/cap)²)               (with softcap)
Rows labelled ignore_index have loss 0 and zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from drift_engine.kernels._chunking import (
    MIN_VOCAB_SLAB_BYTES,
    VOCAB_SLAB_BUDGET_BYTES,
    LinearGrads,
    chunk_bounds,
    columns_per_slab,
    linear_logits,
    matmul_accumulate,
    matmul_fp32,
    row_kernel_config,
    rows_per_chunk,
    sum_rows_fp32,
    token_chunk_rows,
)
from drift_engine.kernels.labels import IGNORE_INDEX

__all__ = ["ce_forward", "resolve_schedule"]


@triton.jit
def _tanh(x):
    # tanh from one exp of a non-positive argument: no overflow for any |x|.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (R, n_cols) input dtype; overwritten with grad-logits when WRITE_GRAD
    logits_row_stride,
    labels_ptr,  # (R,) int64, vocabulary ids (or ignore_index)
    row_coef_ptr,  # (R,) fp32: coefficient of each row's loss in the differentiated sum
    loss_ptr,  # (R,) fp32 out (COMPUTE_LSE)
    lse_ptr,  # (R,) fp32 out (COMPUTE_LSE) or in (not COMPUTE_LSE)
    n_cols,  # columns held in the buffer: V, or a slab's width
    col_offset,  # vocabulary id of the buffer's column 0 (a slab's start)
    vocab_size,  # full V, for the smoothing term
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride  # 64-bit: R·V may exceed 2^31
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    local_label = label - col_offset  # target column inside this buffer, if any

    if COMPUTE_LSE:
        # Sweep 1: online max / sum-exp over the row, plus Σ s for label smoothing.
        running_max = -float("inf")
        running_sum = 0.0
        sum_s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            if HAS_SMOOTHING:
                sum_s += tl.sum(tl.where(mask, s, 0.0), axis=0)
            s = tl.where(mask, s, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(s, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(s - new_max), axis=0
            )
            running_max = new_max
        lse = running_max + tl.log(running_sum)

        # Target logit: one scalar load (row 0's column for ignored rows, unused).
        s_target = tl.load(row_ptr + tl.where(ignored, 0, local_label)).to(tl.float32)
        if HAS_SOFTCAP:
            s_target = softcap * _tanh(s_target / softcap)
        loss = (1.0 - label_smoothing) * (lse - s_target) + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss += label_smoothing * (lse - sum_s / vocab_size)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        # Sweep 2: grad-logits × row_coef, written over the logits (same buffer, same
        # dtype: the next GEMMs read it as g). Ignored rows get exact zeros.
        coef = tl.load(row_coef_ptr + row)
        coef = tl.where(ignored, 0.0, coef)
        p_scale = 1.0 + 2.0 * z_loss * lse  # z-loss: ∂(z·lse²)/∂s_j = 2z·lse·p_j
        target_weight = 1.0 - label_smoothing
        uniform_weight = label_smoothing / vocab_size
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                s = softcap * _tanh(x / softcap)
            else:
                s = x
            p = tl.exp(s - lse)
            grad = p * p_scale - tl.where(offs == local_label, target_weight, 0.0)
            if HAS_SMOOTHING:
                grad -= uniform_weight
            if HAS_SOFTCAP:
                # d(cap·tanh(x/cap))/dx = 1 - tanh² = 1 - (s/cap)²
                t = s / softcap
                grad *= 1.0 - t * t
            grad = tl.where(ignored, 0.0, grad * coef)
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


# (ignore_index, label_smoothing, z_loss, softcap): what the row kernel needs of the loss.
_LossOptions = tuple[int, float, float, "float | None"]


def _launch_rows(
    logits: torch.Tensor,  # (R, C) contiguous rows
    labels: torch.Tensor,  # (R,) int64
    row_coef: torch.Tensor | None,  # (R,) fp32
    loss: torch.Tensor | None,  # (R,) fp32
    lse: torch.Tensor,  # (R,) fp32
    loss_options: _LossOptions,
    *,
    vocab_size: int,
    col_offset: int,
    compute_lse: bool,
    write_grad: bool,
) -> None:
    num_rows, num_cols = logits.shape
    if num_rows == 0:
        return
    block_v, num_warps = row_kernel_config(num_cols)
    ignore_index, label_smoothing, z_loss, softcap = loss_options
    _ce_rows_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        labels,
        row_coef if row_coef is not None else lse,  # unread when not write_grad
        loss if loss is not None else lse,  # unwritten when not compute_lse
        lse,
        num_cols,
        col_offset,
        vocab_size,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        COMPUTE_LSE=compute_lse,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def resolve_schedule(schedule: str, with_grad: bool) -> str:
    """The schedule used: "vocab_slabs" only when asked for and gradients are wanted.

    "auto" picks "token_chunks" (the fastest); a forward without gradients is a single
    pass over row chunks whatever the schedule.
    """
    if with_grad and schedule == "vocab_slabs":
        return "vocab_slabs"
    return "token_chunks"


def ce_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    row_coef: torch.Tensor | None = None,  # (N,) fp32
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    schedule: str = "auto",
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
]:
    """Per-row loss and log-sum-exp; with ``row_coef``, also the gradients of
    ``Σ_i row_coef[i]·loss[i]`` w.r.t. hidden, weight and bias (None for a None bias).

    Returns ``(loss (N,) fp32, lse (N,) fp32, grad_hidden, grad_weight, grad_bias)``;
    the gradients are None without ``row_coef`` and otherwise in their inputs' dtypes.
    ``chunk_size`` is the rows of logits per chunk (None: from a byte budget); ``schedule``
    is "token_chunks", "vocab_slabs" or "auto" (= "token_chunks").
    """
    num_rows = hidden.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    loss_options = (ignore_index, label_smoothing, z_loss, softcap)
    rows = token_chunk_rows(num_rows, weight.shape[0], hidden.element_size(), chunk_size)
    if row_coef is None:
        _ce_token_chunks(hidden, weight, bias, labels, None, loss, lse, loss_options, rows)
        return loss, lse, None, None, None
    row_coef = row_coef.to(torch.float32).contiguous()
    if resolve_schedule(schedule, with_grad=True) == "vocab_slabs":
        grads = _ce_vocab_slabs(
            hidden, weight, bias, labels, row_coef, loss, lse, loss_options, chunk_size
        )
    else:
        grads = _ce_token_chunks(
            hidden, weight, bias, labels, row_coef, loss, lse, loss_options, rows
        )
    return (loss, lse, *grads)


def _ce_token_chunks(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,)
    row_coef: torch.Tensor | None,  # (N,) fp32, None for forward only
    loss: torch.Tensor,  # (N,) fp32 out
    lse: torch.Tensor,  # (N,) fp32 out
    loss_options: _LossOptions,
    chunk_rows: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Row chunks over the full vocabulary: logits GEMM, row kernel, and (with
    ``row_coef``) the two gradient GEMMs reading the grad-logits from the same buffer."""
    num_rows = hidden.shape[0]
    vocab_size = weight.shape[0]
    with_grad = row_coef is not None
    chunks = chunk_bounds(num_rows, chunk_rows)
    grads = LinearGrads(hidden, weight, bias, len(chunks)) if with_grad else None

    for start, end in chunks:
        logits = linear_logits(hidden[start:end], weight, bias)  # (C, V) input dtype
        _launch_rows(
            logits,
            labels[start:end],
            row_coef[start:end] if with_grad else None,
            loss[start:end],
            lse[start:end],
            loss_options,
            vocab_size=vocab_size,
            col_offset=0,
            compute_lse=True,
            write_grad=with_grad,
        )
        if with_grad:
            grads.add(start, end, logits)  # the row kernel overwrote logits with grad-logits
        # Release this chunk's logits before the next chunk's GEMM allocates its own.
        del logits

    if grads is None:
        return None, None, None
    return grads.result()


def _ce_vocab_slabs(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,)
    row_coef: torch.Tensor,  # (N,) fp32
    loss: torch.Tensor,  # (N,) fp32 out
    lse: torch.Tensor,  # (N,) fp32 out
    loss_options: _LossOptions,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Memory-lean schedule: pass 1 computes loss and lse over row chunks (forward GEMM
    only); pass 2 recomputes each vocabulary slab's logits for all rows, turns them into
    grad-logits, writes that slab of grad_weight once and accumulates grad_hidden."""
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    elt = hidden.element_size()
    low_precision = hidden.dtype != torch.float32

    # Bytes of the gradient state that pass 2 holds; pass 1 runs before any of it exists,
    # so its logits chunks may be that large without raising the peak.
    grad_state_bytes = vocab_size * hidden_size * elt + num_rows * hidden_size * (
        elt + (4 if low_precision else 0)
    )
    if chunk_size:
        pass1_rows = chunk_size
        slab_cols = columns_per_slab(
            vocab_size, max(1, num_rows) * elt, chunk_size * vocab_size * elt
        )
    else:
        pass1_rows = rows_per_chunk(
            num_rows, vocab_size * elt, max(grad_state_bytes, VOCAB_SLAB_BUDGET_BYTES)
        )
        slab_bytes = min(
            VOCAB_SLAB_BUDGET_BYTES, max(MIN_VOCAB_SLAB_BYTES, num_rows * hidden_size * elt)
        )
        slab_cols = columns_per_slab(vocab_size, max(1, num_rows) * elt, slab_bytes)

    # Pass 1: loss and lse (the normaliser every slab's softmax needs), in row chunks no
    # larger than the gradient state pass 2 allocates, so pass 1 never sets the peak.
    _ce_token_chunks(hidden, weight, bias, labels, None, loss, lse, loss_options, pass1_rows)

    # Pass 2: one vocabulary slab of all rows at a time.
    grad_weight = torch.empty_like(weight)  # (V, H), each slab written once
    grad_bias = torch.empty_like(bias) if bias is not None else None
    # grad_hidden sums over slabs: in place for fp32 inputs, in an fp32 buffer otherwise.
    grad_hidden_acc = None  # (N, H) fp32
    for v_start, v_end in chunk_bounds(vocab_size, slab_cols):
        weight_slab = weight[v_start:v_end]  # (Vs, H)
        bias_slab = bias[v_start:v_end] if bias is not None else None
        logits = linear_logits(hidden, weight_slab, bias_slab)  # (N, Vs) input dtype
        _launch_rows(
            logits,
            labels,
            row_coef,
            None,
            lse,
            loss_options,
            vocab_size=vocab_size,
            col_offset=v_start,
            compute_lse=False,
            write_grad=True,
        )
        grad_logits = logits  # (N, Vs)
        torch.mm(grad_logits.T, hidden, out=grad_weight[v_start:v_end])  # (Vs, H)
        if grad_bias is not None:
            grad_bias[v_start:v_end] = sum_rows_fp32(grad_logits)
        if grad_hidden_acc is None:
            grad_hidden_acc = matmul_fp32(grad_logits, weight_slab)  # (N, H) fp32
        else:
            matmul_accumulate(grad_hidden_acc, grad_logits, weight_slab)
        del logits, grad_logits

    grad_hidden = grad_hidden_acc.to(hidden.dtype) if low_precision else grad_hidden_acc
    return grad_hidden, grad_weight, grad_bias
