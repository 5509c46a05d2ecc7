"""Packaging: the Triton kernels in kernels/ install as the subpackage drift_engine.kernels.

csrc/ holds optional native code. It is built only when DRIFT_ENGINE_BUILD_NATIVE=1 and a
CUDA toolchain is present; the package is complete without it (every op has a Triton and a
pure-PyTorch path).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["drift_engine", "drift_engine.*"])
packages.append("drift_engine.kernels")

setup(
    packages=packages,
    package_dir={"drift_engine.kernels": "kernels"},
    package_data={"drift_engine": ["py.typed"]},
)
