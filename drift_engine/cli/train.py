"""``drift-engine train``: importance-weighted SFT on a rollouts file.

A thin layer over ``drift_engine.train.config``: defaults, then ``--config FILE`` (TOML),
then ``--set KEY=VALUE`` (any key of the file), then the flags given on the command line,
then validation of the whole configuration. The flags are generated from TrainConfig's
fields (their flag, type, choices, default and help), so ``--help`` is the configuration's
own documentation.
"""

from __future__ import annotations

import shlex
import sys
import tomllib
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click
from click.core import ParameterSource

from drift_engine.errors import ConfigError
from drift_engine.fields import FLAG, HELP, field_default
from drift_engine.train.config import (
    TrainConfig,
    apply_overrides,
    field_type,
    leaf_fields,
    load_config,
)


def _flag_options() -> dict[str, tuple[str, click.Option]]:
    """{parameter name: (dotted TrainConfig key, its click option)} for every setting with
    a flag: type, choices (a ``Literal``'s values), default and help all come from the
    field (``drift_engine.fields.option``), so --help shows TrainConfig's defaults."""
    options = {}
    for key, f in leaf_fields():
        decl = f.metadata.get(FLAG)
        if decl is None:
            continue
        hint = field_type(TrainConfig, key)
        args = [a for a in get_args(hint) if a is not type(None)]
        if get_origin(hint) in (Union, UnionType) and len(args) == 1:
            hint = args[0]  # X | None: the flag takes an X
        default = field_default(f)
        kwargs: dict[str, Any] = {
            "help": f.metadata[HELP],
            "default": None if default in (None, "", []) else default,
        }
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if "flag_value" in f.metadata:  # the flag alone takes this value
            kwargs.update(is_flag=False, flag_value=f.metadata["flag_value"])
        elif hint is bool:
            if "/" not in decl:  # --x alone switches on (--x/--no-x: both ways)
                kwargs["is_flag"] = True
        elif get_origin(hint) is Literal:
            kwargs["type"] = click.Choice(get_args(hint))
        elif get_origin(hint) is list:
            kwargs["callback"] = _comma_list
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:  # a bug in the config, not user input
            raise TypeError(f"no command line type for {key}: {hint!r}")
        option = click.Option([decl], **kwargs)
        options[option.name] = (key, option)
    return options


def _comma_list(ctx: click.Context, param: click.Parameter, value: Any) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


_FLAGS = _flag_options()


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


def build_config(
    config_file: str | None, flags: dict[str, Any], settings: tuple[str, ...] | list[str] = ()
) -> TrainConfig:
    """The validated TrainConfig for a command line: TOML file first, then the ``--set``
    settings, then the flags (those given: a None value means not given)."""
    config = load_config(config_file) if config_file else TrainConfig()
    set_keys = parse_set_options(settings)
    flag_keys = {_FLAGS[name][0]: value for name, value in flags.items() if value is not None}
    twice = sorted(set(set_keys) & set(flag_keys))
    if twice:
        flag = next(o.opts[0] for k, o in _FLAGS.values() if k == twice[0])
        raise ConfigError(
            f"{twice[0]} is given twice: use {flag} or --set {twice[0]}=..., not both"
        )
    config = apply_overrides(config, set_keys)
    config = apply_overrides(config, flag_keys)
    return config.validate()


def _with_flags(command: click.Command) -> click.Command:
    """Add the flags generated from TrainConfig to ``command`` (after --config and --set)."""
    command.params.extend(option for _, option in _FLAGS.values())
    return command


@_with_flags
@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="TOML configuration; --set and the flags below override its keys.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any key of the TOML configuration, e.g. --set optim.betas=[0.9,0.95] "
    "(repeatable; VALUE read as TOML when it can be).",
)
def train(config_file: str | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Importance-weighted SFT on a rollouts file (packed, fused loss).

    \b
    drift-engine train --data rollouts.safetensors --model Qwen/Qwen2.5-3B-Instruct --out runs/drift
    drift-engine train --config train.toml --lr 1e-5 --resume
    drift-engine train --config train.toml --set schedule.min_lr_ratio=0.1
    """
    import torch.distributed as dist

    from drift_engine.train.loop import Trainer

    ctx = click.get_current_context()
    given = {
        name: value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    config = build_config(config_file, given, settings)
    argv = sys.argv[sys.argv.index("train") + 1 :] if "train" in sys.argv else None
    command = shlex.join(["drift-engine", "train", *argv]) if argv is not None else None
    try:
        trainer = Trainer(config, command=command)
        result = trainer.fit()
    finally:
        # Tear the torchrun process group down however training ended (also when the
        # trainer failed after joining it).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.ctx.is_main and result.nothing_trained is not None:
        click.echo(f"nothing trained: {result.nothing_trained}")  # exit 0: the run is complete
    elif trainer.ctx.is_main:
        click.echo(
            f"trained {result.steps} steps; checkpoint: {result.checkpoint}; model: {result.model}"
        )
