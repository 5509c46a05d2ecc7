"""Packaging: the Triton kernels are the subpackage drift_engine.kernels (drift_engine/kernels/).

They live inside the package, so the wheel, an editable install (any editable mode) and the
source tree (PYTHONPATH=.) import them the same way, with no path mapping or link.

Nothing is compiled at install time, so the wheel is pure Python. The native CPU
cross-entropy's source (drift_engine/csrc/) ships as package data and is compiled on the
user's machine by `drift-engine native build` (drift_engine/ops/native.py); without it every
op runs its Python backend.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["drift_engine", "drift_engine.*"]),
    # The demo's tiny model and problems and the example train config, found at run time
    # through importlib.resources (drift_engine.assets.asset_path).
    package_data={
        "drift_engine": ["py.typed", "csrc/*.cpp"],
        "drift_engine.assets": ["guess-model/*", "guess-problems/*.jsonl", "train.toml"],
        # the arithmetic word problems' train and held-out splits (drift_engine.envs.word_problems)
        "drift_engine.envs": ["data/*.jsonl"],
    },
)
