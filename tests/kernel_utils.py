"""Shared by the op tests: whether the Triton kernel modules import here."""

from __future__ import annotations

import importlib

import pytest


def kernels_importable(module: str) -> bool:
    """Whether ``drift_engine.kernels.<module>`` imports (Triton installed and usable)."""
    try:
        importlib.import_module(f"drift_engine.kernels.{module}")
    except ImportError:
        return False
    return True


def requires_kernels(module: str) -> pytest.MarkDecorator:
    """Skip unless ``drift_engine.kernels.<module>`` imports."""
    return pytest.mark.skipif(
        not kernels_importable(module), reason=f"drift_engine.kernels.{module} not importable"
    )
