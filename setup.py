"""Packaging: the Triton kernels are the subpackage drift_engine.kernels (drift_engine/kernels/).

They live inside the package, so the wheel, an editable install (any editable mode) and the
source tree (PYTHONPATH=.) import them the same way, with no path mapping or link.

There is no native extension: every op has a Triton and a pure-PyTorch path, and a C++/CUDA
piece is only worth adding where it wins a benchmark against them.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["drift_engine", "drift_engine.*"]),
    # The demo's tiny model and problems and the example train config, found at run time
    # through importlib.resources (drift_engine.assets.asset_path).
    package_data={
        "drift_engine": ["py.typed"],
        "drift_engine.assets": ["guess-model/*", "guess-problems/*.jsonl", "train.toml"],
        # the arithmetic word problems' train and held-out splits (drift_engine.envs.word_problems)
        "drift_engine.envs": ["data/*.jsonl"],
    },
)
