"""Options that several commands share, declared once."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click
from click.core import ParameterSource

from drift_engine.errors import ConfigError
from drift_engine.fields import (
    FLAG,
    HELP,
    apply_overrides,
    check_value,
    field_default,
    field_type,
    leaf_fields,
    load_config,
)
from drift_engine.weighting_config import WeightingConfig, gamma_beta_rule


def weighting_options(
    effect: str | None = None, unset: str | None = None
) -> Callable[[click.Command], click.Command]:
    """``--gamma`` and ``--beta``: WeightingConfig's fields (their help and range, checked
    as the command line is read). With ``effect``/``unset`` both default to unset and the
    help states the one rule (``gamma_beta_rule``); without, they default to
    WeightingConfig's values."""
    defaults = WeightingConfig()

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name in ("beta", "gamma"):  # applied bottom-up: --gamma is listed first
            field = WeightingConfig.__dataclass_fields__[name]
            help_text = field.metadata[HELP]
            if effect is not None:
                help_text += " " + gamma_beta_rule(effect, unset or "")
            command = click.option(
                f"--{name}",
                type=float,
                default=None if effect is not None else getattr(defaults, name),
                show_default=effect is None,
                callback=lambda ctx, param, value: check_value(
                    WeightingConfig, param.name, value, f"--{param.name}"
                ),
                help=help_text,
            )(command)
        return command

    return decorate


# Metadata of a field (``drift_engine.fields.option``) handed to its click option as is.
_CLICK_EXTRAS = ("metavar", "show_default", "multiple")


def flag_options(cls: type) -> dict[str, tuple[str, click.Option]]:
    """{parameter name: (dotted key of ``cls``, its click option)} for every field of the
    configuration dataclass ``cls`` (and its sections) that has a flag: type, choices (a
    ``Literal``'s values), default and help all come from the field, so --help shows the
    configuration's own defaults. ``multiple=True`` metadata makes a repeatable flag
    (``--model A --model B``) of a list field; other list fields take comma lists. The
    flags of ``cls``'s own fields come before those it inherits (the command's own first in
    --help)."""
    inherited = {f.name for base in cls.__mro__[1:] if is_dataclass(base) for f in fields(base)}
    options = {}
    for key, f in sorted(leaf_fields(cls), key=lambda item: item[0] in inherited):
        decl = f.metadata.get(FLAG)
        if decl is None:
            continue
        decls = [decl] if isinstance(decl, str) else list(decl)
        hint = field_type(cls, key)
        args = [a for a in get_args(hint) if a is not type(None)]
        if get_origin(hint) in (Union, UnionType) and len(args) == 1:
            hint = args[0]  # X | None: the flag takes an X
        default = field_default(f)
        kwargs: dict[str, Any] = {
            "help": f.metadata[HELP],
            "default": None if default in (None, "", []) else default,
        }
        kwargs.update({k: f.metadata[k] for k in _CLICK_EXTRAS if k in f.metadata})
        if "flag_value" in f.metadata:  # the flag alone takes this value
            kwargs.update(is_flag=False, flag_value=f.metadata["flag_value"])
        elif hint is bool:
            if "/" not in decls[0]:  # --x alone switches on (--x/--no-x: both ways)
                kwargs["is_flag"] = True
        elif get_origin(hint) is Literal:
            kwargs["type"] = click.Choice(get_args(hint))
        elif get_origin(hint) is list and f.metadata.get("multiple"):
            kwargs["type"] = str
        elif get_origin(hint) is list:
            kwargs.update(type=str, callback=_comma_list(*get_args(hint)))
            if default:
                kwargs["default"] = ",".join(str(item) for item in default)
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # a bug in the config, not user input
            raise TypeError(f"no command line type for {key}: {hint!r}")
        option = click.Option(decls, **kwargs)
        options[option.name] = (key, option)
    return options


def _comma_list(kind: type = str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """The callback of a flag that takes a comma list of ``kind`` items (str or int)."""

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> list[Any] | None:
        if value is None or isinstance(value, list):
            return value
        items = [item.strip() for item in value.split(",") if item.strip()]
        try:
            return [kind(item) for item in items]
        except ValueError:
            raise ConfigError(
                f"{param.opts[0]} takes comma-separated {kind.__name__} values, got {value!r}"
            ) from None

    return parse


def given_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags of the running command that the command line gave (not their defaults);
    a repeatable flag's values as a list."""
    ctx = click.get_current_context()
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }


def parse_set_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("optim.lr=1e-5", "optim.betas=[0.9, 0.95]")`` -> {dotted key: value}. A value is
    read as a TOML value (number, boolean, array, quoted string) when it is one, else kept
    as the string given (``--set data.path=r.safetensors``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set optim.lr=1e-5")
        try:
            overrides[key] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw
    return overrides


def config_of_command_line(
    cls: type,
    options: dict[str, tuple[str, click.Option]],
    config_file: str | None,
    flags: dict[str, Any],
    settings: tuple[str, ...] | list[str] = (),
    arguments: dict[str, Any] | None = None,
) -> Any:
    """The validated ``cls`` of a command line: defaults, then the TOML file, then the
    ``--set`` settings, then the flags given (a None value means not given) and
    ``arguments`` ({key: value} of the command's positional arguments given). A key set both
    by --set and by its flag is refused; a required setting that none of them gives
    (``cls.missing()``, where the class has it: a list of keys) is click's missing option."""
    config = load_config(config_file, cls) if config_file else cls()
    set_keys = parse_set_options(settings)
    flag_keys = {options[name][0]: value for name, value in flags.items() if value is not None}
    twice = sorted(set(set_keys) & set(flag_keys))
    if twice:
        flag = next(o.opts[0] for k, o in options.values() if k == twice[0])
        raise ConfigError(
            f"{twice[0]} is given twice: use {flag} or --set {twice[0]}=..., not both"
        )
    config = apply_overrides(config, set_keys)
    config = apply_overrides(config, {**flag_keys, **(arguments or {})})
    missing = config.missing() if hasattr(config, "missing") else []
    if missing:
        option = next(o for k, o in options.values() if k == missing[0])
        raise click.MissingParameter(ctx=click.get_current_context(silent=True), param=option)
    return config.validate()


def with_flags(
    options: dict[str, tuple[str, click.Option]],
) -> Callable[[click.Command], click.Command]:
    """Add the generated ``options`` to a command (after its own parameters)."""

    def decorate(command: click.Command) -> click.Command:
        command.params.extend(option for _, option in options.values())
        return command

    return decorate


def config_and_set_options(what: str) -> Callable[[click.Command], click.Command]:
    """``--config FILE`` (TOML) and ``--set KEY=VALUE`` of a command whose flags are
    generated from a configuration's fields; ``what`` is an example of --set."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Any key of the TOML configuration, e.g. --set {what} "
            "(repeatable; VALUE read as TOML when it can be).",
        )(command)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(),
            help="TOML configuration; --set and the flags below override its keys.",
        )(command)

    return decorate
