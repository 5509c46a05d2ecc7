"""``drift-engine native``: build the native CPU cross-entropy for this machine, or say
whether the ops use it (drift_engine/ops/native.py)."""

from __future__ import annotations

import sys

import click


@click.command("native")
@click.argument("action", type=click.Choice(["status", "build"]), default="status")
@click.option("--verbose", is_flag=True, help="Print the compiler command.")
def native(action: str, verbose: bool) -> None:
    """Build (ACTION build, about 20 s) or report on (ACTION status) the native CPU
    cross-entropy.

    The build compiles drift_engine/csrc/cross_entropy_cpu.cpp against the installed torch
    with the machine's C++ compiler ($CXX, else c++) into the cache ($DRIFT_ENGINE_CACHE,
    default ~/.cache/drift-engine). Once built, the PyTorch backend's fp32 cross-entropy on
    CPU uses it in every process; without it every op runs in Python, with the same results
    to fp32 rounding. DRIFT_ENGINE_NATIVE=0 turns it off.
    """
    from drift_engine.ops import native as native_code

    if action == "build":
        click.echo(f"built {native_code.build(verbose=verbose)}")
        return
    state = native_code.load_state()
    if state in ("off", "unsupported"):
        reason = f"{native_code.NATIVE_ENV}=0" if state == "off" else f"not Linux: {sys.platform}"
        click.echo(f"off ({reason}): every op runs its Python backend")
        return
    try:
        path = native_code.library_file()
    except OSError as err:  # e.g. the source file missing from the installation
        click.echo(f"not available ({err}); every op runs its Python backend")
        return
    if state == "loaded":
        click.echo(f"loaded {path}")
    elif state == "failed":
        click.echo(f"built but not loaded ({path}; the warning above says why); rebuild it")
    else:
        click.echo(f"not built (no {path}); `drift-engine native build` builds it")
