"""The optional native CPU cross-entropy (drift_engine/csrc/cross_entropy_cpu.cpp): building
it, loading it, and where the ops use it.

    drift-engine native build     # compile it for this machine (about 20 s)
    drift-engine native status    # is it built, and do the ops use it?

``build`` compiles the source against the installed torch with the machine's C++ compiler
($CXX, else c++) into the cache (``$DRIFT_ENGINE_CACHE``, default ~/.cache/drift-engine,
under ``native/``). The file's name is a hash of the source's content, torch's version and
headers, the flags and the CPU's instruction set (``-march=native``), so a new torch or
another machine needs a new build and never loads a stale one; which compiler built it does
not enter (any build of the same source links the same torch). Without a build every op
runs its Python backend: the results agree to fp32 rounding, only the speed differs.
``DRIFT_ENGINE_NATIVE=0`` turns it off. Linux only.

Where it serves (``serves``): the PyTorch backend's cross-entropy on CPU with fp32 hidden,
weight and bias and no softcap. ``torch_impl.ce_forward`` runs its chunk loop natively
(every reduction, eager and under torch.compile), and in eager mode the weighted scalar loss
("mean"/"sum" with gradients) is one native call with its autograd node in C++
(``autograd.linear_cross_entropy``). Log-probs, softcapped logits and 16-bit inputs run in
Python.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from drift_engine.errors import DriftError
from drift_engine.files import atomic_path, cache_root

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cross_entropy_cpu.cpp"
NATIVE_ENV = "DRIFT_ENGINE_NATIVE"  # "0" keeps every op on its Python backend
# -fno-trapping-math lets the row pass's floor() vectorise (4x faster exp at V=120); the code
# reads no floating-point exception flags. -fopenmp makes at::parallel_for parallel (without
# it ATen's header runs the loop on one thread); the library then needs libgomp.so.1, which
# the dynamic loader finds already loaded by torch, so there is one OpenMP runtime.
CXX_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-std=c++20")


class NativeBuildError(DriftError):
    """The native code could not be compiled here."""


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _torch_flags() -> list[str]:
    """Compile and link flags for the installed torch: ABI, headers, libraries."""
    from torch.utils import cpp_extension

    (torch_lib,) = cpp_extension.library_paths()[:1]
    return [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        f"-Wl,-rpath,{torch_lib}",
    ]


def compile_command(output: Path) -> list[str]:
    """The command that builds the shared library ``output`` from SOURCE."""
    return [
        _compiler(),
        *CXX_FLAGS,
        "-shared",
        "-fPIC",
        str(SOURCE),
        "-o",
        str(output),
        *_torch_flags(),
    ]


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (x86's "flags",
    Arm's "Features" and "CPU part")."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor()
    keys = ("flags", "features", "model name", "cpu part")
    lines = {line for line in text.splitlines() if line.split(":")[0].strip().lower() in keys}
    return "\n".join(sorted(lines))


@functools.cache
def library_file() -> Path:
    """Where the build of this source for this torch and CPU lives (it may not exist)."""
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__,
        torch.version.git_version,
        " ".join((*CXX_FLAGS, *_torch_flags())),
        platform.machine(),
        _cpu_features(),
    ):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return cache_root() / "native" / f"drift_engine_native-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile SOURCE into ``library_file()`` (replacing it atomically); return its path."""
    if not sys.platform.startswith("linux"):
        raise NativeBuildError(
            f"the native CPU cross-entropy is built and loaded on Linux only (this is "
            f"{sys.platform}); every op runs its Python backend here."
        )
    target = library_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        command = compile_command(tmp)
        if verbose:
            print(shlex.join(command), file=sys.stderr)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            raise NativeBuildError(
                f"no C++ compiler {command[0]!r} found; install g++ or clang++ (or set CXX). "
                "Without the native build every op runs its Python backend."
            ) from None
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            detail = "; ".join(errors[:3]) or done.stderr.strip()[-500:]
            raise NativeBuildError(
                f"compiling {SOURCE.name} failed ({command[0]} exited {done.returncode}): "
                f"{detail}. Rerun with --verbose for the command; without the native build "
                "every op runs its Python backend."
            )
    return target


_state: str | None = None  # "loaded", "off", "unsupported", "missing", "failed"; None: not tried
_disabled = contextvars.ContextVar("drift_engine_native_disabled", default=False)


def load_state() -> str:
    """Loads the library on the first call; then says how that went: "loaded", "off"
    (DRIFT_ENGINE_NATIVE=0), "unsupported" (not Linux), "missing" (not built) or "failed"
    (built but did not load; warned once)."""
    global _state
    if _state is None:
        _state = _load()
    return _state


def _load() -> str:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return "off"
    if not sys.platform.startswith("linux"):
        return "unsupported"
    path = None
    try:
        path = library_file()
        if not path.is_file():
            return "missing"
        torch.ops.load_library(str(path))
        return "loaded"
    except Exception as err:  # anything: the Python backend is always there to fall back on
        warnings.warn(
            f"the native CPU cross-entropy ({path or 'its build'}) did not load ({err}); the "
            "Python backend runs instead. Rebuild it with `drift-engine native build`.",
            stacklevel=2,
        )
        return "failed"


def available() -> bool:
    """Whether the native ops serve this context (loading them on the first call)."""
    return not _disabled.get() and load_state() == "loaded"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block on the Python backend (the tests' and benchmarks' comparison); it holds
    in this thread or task only."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def serves(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    softcap: float | None,
) -> bool:
    """Whether the native code runs this cross-entropy: CPU, fp32, no softcap, built."""
    fp32 = torch.float32
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == fp32
        and weight.dtype == fp32
        and (bias is None or bias.dtype == fp32)
        and softcap is None
        and available()
    )
