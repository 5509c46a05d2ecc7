"""Packaging: the Triton kernels in kernels/ install as the subpackage drift_engine.kernels.

drift_engine/kernels is a relative symlink to ../kernels, so the source tree imports the
same way as an installed package (PYTHONPATH=., legacy or modern editable installs).

There is no native extension: every op has a Triton and a pure-PyTorch path, and a C++/CUDA
piece is only worth adding where it wins a benchmark against them.
"""

from setuptools import find_packages, setup

packages = sorted(
    set(find_packages(include=["drift_engine", "drift_engine.*"])) | {"drift_engine.kernels"}
)

setup(
    packages=packages,
    package_dir={"drift_engine.kernels": "kernels"},
    # The demo's tiny model and problems and the example train config, found at run time
    # through importlib.resources (drift_engine.assets.asset_path).
    package_data={
        "drift_engine": ["py.typed"],
        "drift_engine.assets": ["guess-model/*", "guess-problems/*.jsonl", "train.toml"],
    },
)
