"""Documented, checked dataclass fields: the one place a configuration field's default,
help text, command line flag and check are written.

``option(default, help=..., flag=..., check=...)`` is a ``dataclasses.field`` whose metadata
holds the rest; ``check_fields`` runs every field's check (recursing into nested sections),
and the command line builds its options from the same metadata
(``drift_engine.cli.train``), so a field's ``--help``, its TOML key and its validation
cannot disagree. A check returns what is wrong with a value (``"must be > 0"``) or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from drift_engine.errors import ConfigError

Check = Callable[[Any], "str | None"]

HELP = "help"  # the field's documentation: its --help text and its row in the docs
FLAG = "flag"  # its command line flag, e.g. "--lr" or "--compile/--no-compile"
CHECK = "check"  # Check, applied to any value but None


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    check: Check | None = None,
    default_factory: Any = dataclasses.MISSING,
    **extra: Any,
) -> Any:
    """A dataclass field documented by ``help``, set on the command line by ``flag`` (if
    any) and checked by ``check``; ``extra`` metadata (e.g. ``metavar``) goes to the flag."""
    metadata = {HELP: help, FLAG: flag, CHECK: check, **extra}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def check_fields(config: Any, prefix: str = "") -> None:
    """Run the check of every field of ``config`` and its nested sections; raise
    ConfigError naming the first bad key (``prefix`` + field name)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        check = f.metadata.get(CHECK)
        problem = check(value) if check is not None and value is not None else None
        if problem:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key} {problem}, got {shown!r}")


def at_least(low: float, note: str = "") -> Check:
    return lambda v: None if v >= low else f"must be >= {low}{note}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be > {low}"


def within(low: float, high: float, *, high_open: bool = False) -> Check:
    """``[low, high]``, or ``[low, high)`` with ``high_open``."""
    close = ")" if high_open else "]"
    if high_open:
        return lambda v: None if low <= v < high else f"must be in [{low}, {high}{close}"
    return lambda v: None if low <= v <= high else f"must be in [{low}, {high}{close}"


def field_default(f: dataclasses.Field) -> Any:
    """The default value of field ``f`` (a fresh one for a ``default_factory``)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unset_variant(cls: type, name: str, *, help: str, flag: str | None = None) -> Any:
    """A field defaulting to None ("unset") that takes its check from field ``name`` of
    ``cls``, and its help from it followed by ``help`` (what unset means here)."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(
        None,
        help=f"{source.metadata[HELP]} {help}".strip(),
        flag=flag if flag is not None else source.metadata.get(FLAG),
        check=source.metadata.get(CHECK),
    )


def check_value(cls: type, name: str, value: Any, key: str) -> Any:
    """``value`` if field ``name`` of ``cls`` accepts it; else ConfigError naming ``key``."""
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get(CHECK)
    problem = check(value) if check is not None and value is not None else None
    if problem:
        raise ConfigError(f"{key} {problem}, got {value!r}")
    return value
