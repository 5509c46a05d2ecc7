"""The package as a user installs it: build the wheel, install it into a fresh venv that
cannot see the source tree, and run it from a folder outside the source tree: every
subcommand's --help, the demo end to end (on its shipped model, no --rebuild-model) and
one training run on the demo's output with the shipped example config, all without the
native CPU cross-entropy (an empty cache, as on a machine without a compiler); then the
native build from the installed source, which the ops then use.

An editable install (what the other tests use) imports the source tree and hides what a
wheel lacks: package data left out, an import that only works because some other module
imported it first. The fresh venv installs only the wheel (no dependencies: it would
download torch); it reuses the test venv's installed packages through a .pth file, which
adds their folder to sys.path without running that folder's own .pth files (so the
editable install's import hook stays off); triton is hidden, as on a CPU-only install.
Takes about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from drift_engine.cli import _COMMANDS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# Left out of the copy the wheel is built from: build state and caches of this checkout.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-out"
)


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600):
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with the wheel built from this source tree; returns its paths."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["DRIFT_ENGINE_CACHE"] = str(tmp / "cache")  # no native build until the last test

    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source], tmp, env)
    (wheel,) = dist.glob("drift_engine-*.whl")
    shutil.rmtree(source)  # nothing of the source tree is left to import from

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        tmp,
        env,
    )
    # Only now make the test venv's packages (torch, transformers, ...) visible, after them.
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    # No triton, as on a CPU-only install (it is not a dependency; README "Install"): this
    # stand-in, found before the test venv's triton, imports like a missing package.
    (site / "triton").mkdir()
    (site / "triton" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n"
    )

    work = tmp / "work"  # the cwd of every command: outside any source tree
    work.mkdir()
    return {"python": python, "cli": venv / "bin" / "drift-engine", "env": env, "work": work}


def test_wheel_is_the_package_imported(installed):
    code = (
        "import drift_engine; "
        "from drift_engine.ops.backends import _triton_available; "
        "assert not _triton_available(); "
        "print(drift_engine.__file__)"
    )
    found = _run(
        [installed["python"], "-c", code], installed["work"], installed["env"]
    ).stdout.strip()
    assert Path(found).is_relative_to(installed["python"].parent.parent), found
    assert not Path(found).is_relative_to(ROOT), found
    # The Triton kernels ship too (imported on CUDA only; here, located without importing).
    site = Path(found).parent.parent
    source = importlib.util.find_spec("drift_engine.kernels").submodule_search_locations[0]
    kernels = [p.name for p in Path(source).glob("*.py")]
    assert kernels and all((site / "drift_engine" / "kernels" / k).is_file() for k in kernels)
    # and the arithmetic word problems' splits
    splits = sorted(p.name for p in (ROOT / "drift_engine" / "envs" / "data").glob("*.jsonl"))
    assert splits and all((site / "drift_engine" / "envs" / "data" / n).is_file() for n in splits)


def test_every_subcommand_help(installed):
    cli, work, env = installed["cli"], installed["work"], installed["env"]
    top = _run([cli, "--help"], work, env).stdout
    for name in _COMMANDS:
        assert name in top
        out = _run([cli, name, "--help"], work, env).stdout
        assert out.startswith(f"Usage: drift-engine {name}"), out
    assert "0.1.0" in _run([cli, "--version"], work, env).stdout


def test_demo_then_train_from_the_wheel(installed):
    cli, python, work, env = (
        installed["cli"],
        installed["python"],
        installed["work"],
        installed["env"],
    )
    _run([cli, "demo", "--out", "demo", "--samples-per-prompt", "2", "--steps", "2"], work, env)
    demo = work / "demo"
    report = json.loads((demo / "results.json").read_text())
    assert [r["model"] for r in report["results"]] == ["reference", "DRIFT", "rejection sampling"]
    (checkpoint,) = sorted((demo / "drift").glob("checkpoint-*"))

    # The example config ships with the package; train one step on the demo's rollouts.
    config = _run([python, "-m", "drift_engine.assets", "train.toml"], work, env).stdout
    (work / "train.toml").write_text(config)
    out = _run(
        [
            cli,
            "train",
            "--config",
            "train.toml",
            "--data",
            "demo/rollouts.safetensors",
            "--model",
            str(checkpoint),
            "--out",
            "run",
            "--max-steps",
            "1",
            "--no-progress",
        ],
        work,
        env,
    ).stdout
    assert "trained 1 steps" in out, out
    assert list((work / "run").glob("checkpoint-*/model/model.safetensors"))


def test_native_build_from_the_wheel(installed):
    """The C++ source ships in the wheel, builds there, and the installed ops load it and
    give the Python backend's loss and gradients."""
    cli, python, work, env = (
        installed["cli"],
        installed["python"],
        installed["work"],
        installed["env"],
    )
    assert _run([cli, "native", "status"], work, env).stdout.startswith("not built")
    assert _run([cli, "native", "build"], work, env).stdout.startswith("built ")
    assert _run([cli, "native", "status"], work, env).stdout.startswith("loaded ")
    code = """
import torch
from drift_engine import fused_linear_cross_entropy
from drift_engine.ops import native
assert native.available()
torch.manual_seed(0)
hidden, weight = torch.randn(50, 16), torch.randn(40, 16)
labels, weights = torch.randint(0, 40, (50,)), torch.rand(50)
def run():
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, token_weights=weights)
    loss.backward()
    return loss, h.grad, w.grad
native_result = run()
with native.disabled():
    python_result = run()
for a, b in zip(native_result, python_result):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print("native equals python")
"""
    assert "native equals python" in _run([python, "-c", code], work, env).stdout
