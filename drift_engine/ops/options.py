"""Non-tensor options of the fused ops, as frozen dataclasses.

One object carries every option of a call end to end: the functional API builds it, the
nn modules hold it, the autograd layer (autograd.py) passes it to the custom ops
(library.py, whose schemas are generated from these fields) and both backends read it
(``impl="torch"`` in drift_engine.ops.torch_impl, ``impl="triton"`` through
drift_engine.ops.backends, which hands the kernels the plain numbers they need).
Adding an option means adding a field here and reading it where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drift_engine.kernels.labels import IGNORE_INDEX

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "triton", "torch"]
Schedule = Literal["auto", "token_chunks", "vocab_slabs"]


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Options of the (weighted) linear cross-entropy.

    Per-row loss over logits s = softcap(hidden @ weight.T + bias), lse = logsumexp(s):
        loss = (1 - label_smoothing) * (lse - s[label])
             + label_smoothing * (lse - mean(s))
             + z_loss * lse**2
    and 0 for rows whose label is ignore_index.
    """

    ignore_index: int = IGNORE_INDEX
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
    schedule: Schedule = "auto"
    # Backend: "triton", "torch" (chunked PyTorch, any device) or "auto" (Triton on CUDA).
    impl: Impl = "auto"
    # Check labels in [0, V) or ignore_index and token weights finite and >= 0 (one host
    # synchronisation per call).
    check_labels: bool = True


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
    ignore_index: int = IGNORE_INDEX
    chunk_size: int | None = None
    impl: Impl = "auto"
    check_labels: bool = True
