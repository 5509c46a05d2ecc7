"""Triton kernels of drift-engine, installed as ``drift_engine.kernels``.

Each module holds Triton kernels and their plain-tensor launchers (no autograd); the
autograd Functions and the public API live in ``drift_engine.ops``.
"""
