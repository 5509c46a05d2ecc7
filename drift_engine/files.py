"""Checks on where a command will write, made before any work so that nothing is lost."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from drift_engine.errors import ConfigError


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


__all__ = ["check_writable_location"]
