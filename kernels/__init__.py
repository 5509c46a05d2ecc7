"""Triton kernels of drift-engine, installed as ``drift_engine.kernels``.

Each module holds Triton kernels and their plain-tensor launchers (no autograd); the
autograd Functions and the public API live in ``drift_engine.ops``.

* ``cross_entropy``: ``ce_forward`` (fused linear cross-entropy, token-chunk and
  vocabulary-slab schedules);
* ``logprobs``: ``logprobs_forward`` / ``logprobs_backward`` (per-token log-probs, entropy);
* ``_chunking``: chunk sizing and fp32-accumulating GEMM helpers shared by both.

docs/kernels.md describes the algorithm, its cost and its knobs.
"""
