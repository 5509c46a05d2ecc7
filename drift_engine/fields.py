"""Documented, checked dataclass fields: the one place a configuration field's default,
help text, command line flag and check are written.

``option(default, help=..., flag=..., check=...)`` is a ``dataclasses.field`` whose metadata
holds the rest; ``check_fields`` runs every field's check (recursing into nested sections),
and the command line builds its options from the same metadata
(``drift_engine.cli.options.flag_options``), so a field's ``--help``, its TOML key and its
validation cannot disagree. A check returns what is wrong with a value (``"must be > 0"``)
or None. ``flag`` is one declaration (``"--lr"``, ``"--compile/--no-compile"``) or a tuple
of them (``("-n", "--n")``).

Reading any such configuration: ``load_config(path, cls)`` (TOML), ``config_from_dict``
and ``apply_overrides`` (dotted keys, e.g. ``{"optim.lr": 1e-5}``); unknown keys and values
of the wrong type raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

from drift_engine.errors import ConfigError

Check = Callable[[Any], "str | None"]

HELP = "help"  # the field's documentation: its --help text and its row in the docs
FLAG = "flag"  # its command line flag(s), e.g. "--lr", "--compile/--no-compile", ("-n", "--n")
CHECK = "check"  # Check, applied to any value but None


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | tuple[str, ...] | None = None,
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


def field_like(
    cls: type,
    name: str,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """Field ``name`` of ``cls`` again, for another configuration: its help, flag, check
    and extras, with its own default (the source's when none is given) and any
    ``metadata`` given replacing the source's (e.g. ``help=``, ``show_default=``)."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING and default_factory is dataclasses.MISSING:
        default, default_factory = source.default, source.default_factory
    merged = {**source.metadata, **metadata}
    return option(default, default_factory=default_factory, **merged)


def check_value(cls: type, name: str, value: Any, key: str) -> Any:
    """``value`` if field ``name`` of ``cls`` accepts it; else ConfigError naming ``key``."""
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get(CHECK)
    problem = check(value) if check is not None and value is not None else None
    if problem:
        raise ConfigError(f"{key} {problem}, got {value!r}")
    return value


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every setting of ``cls`` and its sections, in order."""
    found: list[tuple[str, dataclasses.Field]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", f))
    return found


def field_type(cls: type, dotted: str) -> Any:
    """The type of the setting ``dotted`` (e.g. "optim.lr") of ``cls``."""
    *parents, name = dotted.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[name]


# ----------------------------------------------------------------------------- reading


def load_config(path: str | Path, cls: type) -> Any:
    """Read a TOML file into a ``cls`` (not yet validated: overrides may follow)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.start}); TOML files are UTF-8: "
            "save it as UTF-8"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(raw, cls, source=str(path))


def config_from_dict(raw: dict[str, Any], cls: type, source: str = "config") -> Any:
    """Build a ``cls`` from nested plain values, rejecting unknown keys and bad types."""
    return _build(cls, raw, prefix="", source=source)


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``config`` with dotted keys replaced, e.g. {"optim.lr": 1e-5}.

    None values are skipped (a command line flag that was not given)."""
    config = _deepcopy(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, name = dotted.split(".")
        target = config
        for part in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ConfigError(f"unknown configuration key {dotted!r}")
            target = getattr(target, part)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise ConfigError(f"unknown configuration key {dotted!r}")
        setattr(target, name, _coerce(value, hints[name], dotted, "command line"))
    return config


def _deepcopy(config: Any) -> Any:
    return config_from_dict(dataclasses.asdict(config), type(config))


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key {dotted!r} (known keys here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, hint, dotted, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a field's type, converting where lossless (int -> float,
    list -> tuple); raise ConfigError naming the key otherwise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, key, source) for v, a in zip(value, args, strict=True)]
        else:
            items = [_coerce(v, args[0], key, source) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug, not user input
