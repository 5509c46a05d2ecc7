"""Shared pieces of the Triton loss launchers: chunk sizing, the GEMMs, row-kernel config.

The launchers in ``cross_entropy.py`` and ``logprobs.py`` leave the three large GEMMs of
a linear loss (logits, grad of hidden, grad of weight) to cuBLAS and fuse everything
row-wise in Triton. What they share lives here:

* how many logit rows (or vocabulary columns) are materialised at once, from a byte
  budget, so that the largest temporary has a known size (``token_chunk_rows`` is the one
  policy of the token-chunk loops);
* ``linear_logits``, the logits GEMM of a chunk, and ``LinearGrads``, the two gradient
  GEMMs of a chunk's grad-logits with grad of weight accumulated in fp32 across chunks;
* ``matmul_accumulate``: ``acc (fp32) += a @ b`` for low-precision ``a``/``b``, using
  cuBLAS's fp32-output GEMM where the running torch has it, so an accumulator spread over
  chunks never rounds to bf16/fp16 between chunks;
* the row-kernel launch configuration (block size and warps per row).

Plain tensors and numbers in, plain tensors out: nothing here imports the rest of
drift_engine.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

# Largest logits temporary of the "token_chunks" schedule, in bytes. One chunk covering
# every row is fastest (grad of weight is then one GEMM written once, no fp32
# accumulator); at this budget both benchmark presets (8192 x 128256 and 16384 x 151936
# bf16) run in one or three chunks, still several times below PyTorch's dense fp32 logits.
TOKEN_CHUNK_BUDGET_BYTES = 2 * 1024**3

# Bounds of the logits slab of the "vocab_slabs" schedule's gradient pass, in bytes. Within
# them the slab is as large as grad_hidden in the input dtype: the final rounding of the
# fp32 grad_hidden accumulator allocates that much anyway, so a smaller slab would not
# lower the peak, and a larger one would raise it. 16 MiB keeps each slab GEMM
# (N x H x slab) near cuBLAS's peak for N in the thousands.
VOCAB_SLAB_BUDGET_BYTES = 128 * 1024**2
MIN_VOCAB_SLAB_BYTES = 16 * 1024**2

# Chunk row counts and slab widths are rounded to multiples of these (GEMM-friendly tiles).
ROW_MULTIPLE = 64
COLUMN_MULTIPLE = 256

# Row kernels sweep one row in blocks of at most this many columns.
MAX_BLOCK_V = 4096


def _equal_pieces(total: int, unit_bytes: int, budget_bytes: int, multiple: int) -> int:
    """Units (rows or columns) per piece so that a piece of ``unit_bytes``-sized units fits
    ``budget_bytes``: ``total`` split into equal pieces (the last one possibly shorter), each
    rounded up to a multiple of ``multiple`` where that still fits, unless one piece holds
    everything."""
    if total <= 0:
        return 1
    max_units = max(1, budget_bytes // max(1, unit_bytes))
    if max_units >= total:
        return total
    units = math.ceil(total / math.ceil(total / max_units))
    rounded = math.ceil(units / multiple) * multiple
    return min(rounded, total) if rounded <= max_units else units


def rows_per_chunk(num_rows: int, row_bytes: int, budget_bytes: int) -> int:
    """Rows per chunk so that a chunk of ``row_bytes``-sized rows fits ``budget_bytes``
    (equal chunks, multiples of ROW_MULTIPLE rows)."""
    return _equal_pieces(num_rows, row_bytes, budget_bytes, ROW_MULTIPLE)


def token_chunk_rows(
    num_rows: int, vocab_size: int, element_size: int, chunk_size: int | None
) -> int:
    """Rows of (rows, V) logits per chunk: ``chunk_size`` when given, otherwise as many as
    fit TOKEN_CHUNK_BUDGET_BYTES."""
    if chunk_size:
        return chunk_size
    return rows_per_chunk(num_rows, vocab_size * element_size, TOKEN_CHUNK_BUDGET_BYTES)


def columns_per_slab(num_columns: int, column_bytes: int, budget_bytes: int) -> int:
    """Vocabulary columns per slab so that a slab of ``column_bytes``-sized columns fits
    (equal slabs, multiples of COLUMN_MULTIPLE columns)."""
    return _equal_pieces(num_columns, column_bytes, budget_bytes, COLUMN_MULTIPLE)


def chunk_bounds(total: int, step: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(total)`` in steps of ``step``."""
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def row_kernel_config(num_columns: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row kernel sweeping ``num_columns`` columns.

    The block is a power of two no wider than the row (under the Triton interpreter a
    masked lane costs as much as a real one), capped at MAX_BLOCK_V.
    """
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(1, num_columns)))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


@functools.cache
def _has_fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` and the in-place
    ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` work for ``dtype`` inputs.

    cuBLAS can multiply bf16/fp16 matrices into an fp32 output (torch >= 2.8 on CUDA
    exposes it as ``out_dtype``); older torch or other devices lack the overloads. Checked
    once per (device type, dtype) on a small exact problem, used as the launchers use them.
    """
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device_type)
        b = torch.tensor([[0.5, 1.0], [1.5, 2.0]], dtype=dtype, device=device_type)
        acc = torch.full((2, 2), 0.25, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        expected = torch.tensor([[3.75, 5.25], [7.75, 11.25]], device=device_type)
        product = torch.mm(a, b, out_dtype=torch.float32)
        return bool(torch.equal(acc, expected)) and product.dtype == torch.float32

    except Exception:  # missing overload, unsupported backend or dtype
        return False


def matmul_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the input dtype.

    With an fp32-output GEMM available, the product is added inside cuBLAS with no
    temporary. Otherwise the product is formed in the input dtype (fp32 accumulation
    inside the GEMM, one rounding) and added to the fp32 accumulator: one rounding per
    chunk, never a running sum in low precision.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _has_fp32_out_gemm(acc.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as a new fp32 tensor (first term of an fp32 accumulator, no memset)."""
    if a.dtype == torch.float32:
        return a @ b
    if _has_fp32_out_gemm(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def sum_rows_fp32(x: torch.Tensor) -> torch.Tensor:
    """Column sums of a (R, C) matrix in fp32: the bias gradient of a chunk."""
    return x.sum(dim=0, dtype=torch.float32)


def linear_logits(
    hidden: torch.Tensor,  # (R, H)
    weight: torch.Tensor,  # (Vs, H)
    bias: torch.Tensor | None,  # (Vs,)
) -> torch.Tensor:
    """(R, Vs) logits ``hidden @ weight.T + bias`` in the input dtype (cuBLAS accumulates
    in fp32 and rounds once)."""
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


class LinearGrads:
    """Gradients of hidden, weight and bias of ``hidden @ weight.T + bias``, gathered from
    the grad-logits of row chunks.

    Each chunk writes its rows of grad_hidden once. grad of weight is one GEMM written once
    when a single chunk covers every row, otherwise an fp32 accumulator across chunks
    rounded once at the end; grad of bias is an fp32 column sum.
    """

    def __init__(
        self,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        num_chunks: int,
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.single_chunk = num_chunks == 1
        self.grad_hidden = torch.empty_like(hidden)  # (N, H), rows written chunk by chunk
        self.grad_weight: torch.Tensor | None = None  # (V, H) input dtype, one chunk only
        self.grad_weight_acc: torch.Tensor | None = None  # (V, H) fp32, several chunks
        self.grad_bias_acc: torch.Tensor | None = None  # (V,) fp32

    def add(self, start: int, end: int, grad_logits: torch.Tensor) -> None:
        """Back-propagate rows [start, end) of the grad-logits (end - start, V)."""
        hidden_chunk = self.hidden[start:end]  # (C, H)
        torch.mm(grad_logits, self.weight, out=self.grad_hidden[start:end])  # (C, H)
        if self.single_chunk:
            self.grad_weight = grad_logits.T @ hidden_chunk  # (V, H), written once
        elif self.grad_weight_acc is None:
            self.grad_weight_acc = matmul_fp32(grad_logits.T, hidden_chunk)
        else:
            matmul_accumulate(self.grad_weight_acc, grad_logits.T, hidden_chunk)
        if self.bias is not None:
            chunk_grad_bias = sum_rows_fp32(grad_logits)  # (V,) fp32
            if self.grad_bias_acc is None:
                self.grad_bias_acc = chunk_grad_bias
            else:
                self.grad_bias_acc += chunk_grad_bias

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(grad_hidden, grad_weight, grad_bias or None) in the inputs' dtypes; zeros for the
        weight's and bias's when no chunk was added (no rows)."""
        grad_weight = self.grad_weight
        if grad_weight is None:
            acc, self.grad_weight_acc = self.grad_weight_acc, None
            grad_weight = (
                torch.zeros_like(self.weight) if acc is None else acc.to(self.weight.dtype)
            )
            del acc
        grad_bias = None
        if self.bias is not None:
            acc, self.grad_bias_acc = self.grad_bias_acc, None
            grad_bias = torch.zeros_like(self.bias) if acc is None else acc.to(self.bias.dtype)
        return self.grad_hidden, grad_weight, grad_bias
