"""Options that several commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from drift_engine.fields import HELP, check_value
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
