"""Triton kernels of drift-engine (``drift_engine.kernels``, the ``impl="triton"`` backend).

Each module holds Triton kernels and their plain-tensor launchers: tensors and numbers in,
tensors out, no autograd. Nothing here imports the rest of drift_engine; the options
dataclasses, validation, autograd and the public API live in ``drift_engine.ops``, which
calls these launchers.

* ``cross_entropy``: ``ce_forward`` (fused linear cross-entropy, token-chunk and
  vocabulary-slab schedules);
* ``logprobs``: ``logprobs_forward`` / ``logprobs_backward`` (per-token log-probs, entropy);
* ``_chunking``: chunk sizing, the logits GEMM and the chunked gradient GEMMs shared by both;
* ``labels``: ``IGNORE_INDEX`` (-100), the label of an untrained position, defined once for
  the whole package.

docs/kernels.md describes the algorithm, its cost and its knobs.
"""
