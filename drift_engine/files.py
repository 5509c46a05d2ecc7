"""Where commands write: checks made before any work, and atomic writes, so that nothing
already written is lost and no reader ever sees half a file; the cache's root."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from drift_engine.errors import ConfigError

CACHE_ENV = "DRIFT_ENGINE_CACHE"  # overrides the cache root (default ~/.cache/drift-engine)


def cache_root() -> Path:
    """Where converted models, downloaded model files and native builds are kept."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "drift-engine"


def check_writable_location(path: str | os.PathLike, option: str = "--out") -> Path:
    """Raise ``ConfigError`` unless ``path`` can be created: its nearest existing ancestor
    is a folder, and a file can be created (and is removed) there. No folder is created."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(
            f"{option} {str(path)!r} cannot be written: {str(folder)!r} is a file, not a "
            "folder; choose another path."
        )
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{option} {str(path)!r} cannot be written: {err.strerror or err} "
            f"({str(folder)!r}); choose a writable folder."
        ) from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block ends
    without an exception, removed otherwise (the rename is atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["CACHE_ENV", "atomic_path", "cache_root", "check_writable_location", "write_text_atomic"]
