"""Non-tensor options of the fused ops, as frozen dataclasses.

They travel as one object through the autograd Functions and into both backends
(`impl="torch"` in drift_engine.ops.torch_impl, `impl="triton"` in drift_engine.kernels),
so `backward` returns a short tuple and both backends read the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "triton", "torch"]


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Options of the (weighted) linear cross-entropy.

    Per-row loss over logits s = softcap(hidden @ weight.T + bias), lse = logsumexp(s):
        loss = (1 - label_smoothing) * (lse - s[label])
             + label_smoothing * (lse - mean(s))
             + z_loss * lse**2
    and 0 for rows whose label is ignore_index.
    """

    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    # Rows of logits materialised at once (a chunk is chunk_size x V); None lets the
    # backend choose from the problem size and free memory.
    chunk_size: int | None = None
    # How the Triton backend walks the (N, V) logits: "token_chunks" (fastest: 3 GEMMs,
    # grad of weight accumulated in fp32 across chunks), "vocab_slabs" (memory-lean: the
    # log-sum-exp first, then each vocabulary slab once, grad of weight written once;
    # 4 GEMMs), or "auto". The torch backend always uses token chunks.
    schedule: Literal["auto", "token_chunks", "vocab_slabs"] = "auto"


@dataclass(frozen=True)
class LogProbOptions:
    """Options of the per-token log-prob / entropy extraction.

    Over logits s = (hidden @ weight.T + bias) / temperature:
        logprob = s[label] - logsumexp(s);  entropy = logsumexp(s) - sum(softmax(s) * s).
    Rows whose label is ignore_index get logprob 0 (and zero gradient); entropy is still
    computed for them.
    """

    temperature: float = 1.0
    return_entropy: bool = False
    ignore_index: int = -100
    chunk_size: int | None = None
