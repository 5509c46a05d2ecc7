"""The weighting settings (γ, β, clipping, normalisation): ``WeightingConfig``, the one
definition of their defaults, meaning and range, used by ``drift_engine.weighting`` (which
re-exports it), the training configuration and every command's ``--gamma``/``--beta``.
A leaf module (no torch), so that reading a configuration stays cheap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drift_engine.fields import above, check_fields, option, within


@dataclass(frozen=True)
class WeightingConfig:
    """How returns become weights (defaults: the DRIFT reference code): the one definition
    of γ, β and clipping, whose fields (help, range) every command and config reuse.

    clip_max is applied after normalisation and not followed by a renormalisation
    (renormalising would push weights back above the bound), so a clipped group averages
    below 1.
    """

    gamma: float = option(
        0.7, help="Per-turn discount γ of the rewards in the return, in [0, 1].",
        flag="--gamma", check=within(0, 1),
    )  # fmt: skip
    beta: float = option(
        0.2, help="Temperature β of the weights exp(R / β), > 0.", flag="--beta", check=above(0)
    )
    clip_max: float | None = option(
        None, help="Upper bound on a weight, after normalisation (none: no clipping).",
        check=above(0),
    )  # fmt: skip
    normalize: Literal["group", "global"] = option(
        "group", help="Normalise the weights over the prompt group or over all trajectories.",
        check=lambda v: None if v in ("group", "global") else "must be 'group' or 'global'",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)


def gamma_beta_rule(effect: str, unset: str) -> str:
    """The one rule of ``--gamma``/``--beta`` on every command, in its help: ``effect`` is
    what giving either does there, ``unset`` what giving neither means."""
    defaults = WeightingConfig()
    return (
        f"Giving --gamma or --beta {effect}, the other taking its default "
        f"({defaults.gamma} / {defaults.beta}); neither: {unset}."
    )


def from_gamma_beta(gamma: float | None, beta: float | None) -> WeightingConfig | None:
    """The WeightingConfig of a command's ``--gamma``/``--beta`` (None: neither given)."""
    if gamma is None and beta is None:
        return None
    defaults = WeightingConfig()
    return WeightingConfig(
        gamma=defaults.gamma if gamma is None else gamma,
        beta=defaults.beta if beta is None else beta,
    )
