"""drift_engine.kernels imports the same way from the wheel, an editable install and the
source tree, and stands on its own (importing it loads nothing else of drift_engine).

A copy of the project's tracked files is built in a temporary folder: a wheel with
``pip wheel --no-deps --no-build-isolation`` and editable wheels through setuptools' PEP 660
hook in its default and its path-based ("compat", what legacy ``setup.py develop`` did)
modes. Each is imported in a fresh interpreter started with ``-S``, so the test
environment's own editable install of drift_engine cannot answer instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ["__init__", "_chunking", "cross_entropy", "logprobs"]

# Imports the kernels, checks that nothing else of drift_engine came with them, then that
# the ops reach the same modules; prints where every module came from.
CHECK = """
import json, site, sys
if {site_dir!r}:
    site.addsitedir({site_dir!r})  # an editable wheel's .pth, ahead of the environment's
sys.path.append({site_packages!r})  # torch, triton; not this environment's .pth files
import drift_engine.kernels.cross_entropy, drift_engine.kernels.logprobs
alone = sorted(m for m in sys.modules if m.startswith("drift_engine") and
               not m.startswith("drift_engine.kernels") and m != "drift_engine")
from drift_engine.ops import backends
files = {{name: sys.modules["drift_engine.kernels" + ("" if name == "__init__" else "." + name)]
         .__file__ for name in {modules!r}}}
files["ops"] = backends._kernels("cross_entropy").__file__
print(json.dumps({{"alone": alone, "files": files}}))
"""


def _import_from(tmp: Path, *, site_dir: Path | None = None, pythonpath: Path | None = None):
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    script = CHECK.format(
        site_packages=sysconfig.get_paths()["purelib"],
        site_dir=str(site_dir) if site_dir else "",
        modules=KERNEL_MODULES,
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=tmp,  # not the project root: nothing is found from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_kernels_under(report, root: Path):
    assert report["alone"] == [], f"importing drift_engine.kernels loaded {report['alone']}"
    folder = (root / "drift_engine" / "kernels").resolve()
    expected = {name: folder / f"{name}.py" for name in KERNEL_MODULES}
    expected["ops"] = folder / "cross_entropy.py"  # what the ops' backend resolution imports
    assert {name: Path(file).resolve() for name, file in report["files"].items()} == expected


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the tracked (and untracked, not ignored) files of the project; outside a
    git checkout, of the package and the packaging files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        package = (ROOT / "drift_engine").rglob("*")
        listed = "\0".join(
            [str(path.relative_to(ROOT)) for path in package if "__pycache__" not in path.parts]
            + ["setup.py", "pyproject.toml", "README.md"]
        )
    names = [name for name in listed.split("\0") if name and (ROOT / name).is_file()]
    # One physical home: no link standing in for the package, no top-level copy.
    assert not (ROOT / "drift_engine" / "kernels").is_symlink()
    assert not any(name.startswith("kernels/") for name in names)
    copy = tmp_path_factory.mktemp("project")
    for name in names:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return copy


def test_source_tree_imports_kernels(project, tmp_path):
    _assert_kernels_under(_import_from(tmp_path, pythonpath=project), project)


def test_wheel_holds_and_imports_kernels(project, tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(project),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("drift_engine-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for module in KERNEL_MODULES:
        assert f"drift_engine/kernels/{module}.py" in names
    assert not any(name.startswith("kernels/") for name in names), "a top-level kernels package"
    _assert_kernels_under(_import_from(tmp_path, pythonpath=tmp_path / "site"), tmp_path / "site")


@pytest.mark.parametrize("mode", ["lenient", "compat"])
def test_editable_install_imports_kernels(project, tmp_path, mode):
    # "compat" puts the project folder on sys.path, as `setup.py develop` (what pip runs
    # for -e with a setuptools older than PEP 660 support) does.
    if not hasattr(pytest.importorskip("setuptools.build_meta"), "build_editable"):
        pytest.skip("this setuptools predates PEP 660 editable wheels")
    build = (
        "from setuptools import build_meta; "
        f"print(build_meta.build_editable({str(tmp_path / 'dist')!r}, "
        f"{{'editable_mode': {mode!r}}}))"
    )
    (tmp_path / "dist").mkdir()
    built = subprocess.run(
        [sys.executable, "-c", build], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = tmp_path / "dist" / built.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    report = _import_from(tmp_path, site_dir=tmp_path / "site")
    _assert_kernels_under(report, project)
