"""Returns and DRIFT importance weights.

For trajectory i with turn rewards r_t (t = 1 ... n_i)::

    R_i = sum_t gamma^(t-1) r_t + format_penalty_i + repeat_penalty_i

and within each prompt group g::

    w_i = exp(R_i / beta) / mean_{j in g} exp(R_j / beta)

the self-normalised importance weights of the KL-regularised optimum
pi* ∝ pi_ref · exp(R / beta); they average 1 in every group. The penalties are stored
already signed: ``format_penalty_term`` (-0.1 per unparseable turn) and
``repeat_penalty_term`` (-lambda · (1 - unique answers / answers), lambda = 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from drift_engine.data.rollouts import (
    META_BETA,
    META_CLIP_MAX,
    META_GAMMA,
    META_NORMALIZE,
    RolloutSet,
)
from drift_engine.errors import ConfigError

REPEAT_PENALTY_COEF = 0.5
FORMAT_PENALTY_PER_TURN = -0.1


@dataclass(frozen=True)
class WeightingConfig:
    """How returns become weights (defaults: the DRIFT reference code).

    gamma: per-turn discount of rewards. beta: temperature of exp(R / beta).
    clip_max: upper bound on a weight, applied after normalisation and not followed by a
        renormalisation (renormalising would push weights back above the bound), so a
        clipped group averages below 1.
    normalize: "group" divides by the mean over the trajectory's prompt group; "global"
        over all trajectories.
    """

    gamma: float = 0.7
    beta: float = 0.2
    clip_max: float | None = None
    normalize: Literal["group", "global"] = "group"

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must lie in [0, 1], got {self.gamma}")
        if not self.beta > 0.0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.clip_max is not None and not self.clip_max > 0.0:
            raise ConfigError(f"clip_max must be > 0 or None, got {self.clip_max}")
        if self.normalize not in ("group", "global"):
            raise ConfigError(f"normalize must be 'group' or 'global', got {self.normalize!r}")


def format_penalty_term(num_unparseable: int, per_turn: float = FORMAT_PENALTY_PER_TURN) -> float:
    """The format-penalty return term: ``per_turn`` (-0.1) for each unparseable turn."""
    if num_unparseable < 0:
        raise ValueError(f"num_unparseable must be >= 0, got {num_unparseable}")
    return per_turn * num_unparseable


def repeat_penalty_term(answers: Sequence[str | None], coef: float = REPEAT_PENALTY_COEF) -> float:
    """The repetition-penalty return term: -coef · (1 - unique answers / answers).

    ``answers`` holds one normalised answer per assistant turn, None where the turn could
    not be parsed; unparseable turns are left out of both counts (the format penalty covers
    them). No parseable answer gives 0.
    """
    parsed = [a for a in answers if a is not None]
    if not parsed:
        return 0.0
    return -coef * (1.0 - len(set(parsed)) / len(parsed))


def compute_returns(
    turn_rewards: Tensor,
    gamma: float,
    format_penalty: Tensor | None = None,
    repeat_penalty: Tensor | None = None,
) -> Tensor:
    """(S,) float32 returns R = sum_t gamma^(t-1) r_t + penalties; NaN rewards are absent turns."""
    rewards = turn_rewards.to(torch.float64)  # (S, K)
    discount = gamma ** torch.arange(rewards.shape[1], dtype=torch.float64)  # (K,) gamma^(t-1)
    returns = torch.nansum(rewards * discount, dim=1)  # (S,)
    for term in (format_penalty, repeat_penalty):
        if term is not None:
            returns = returns + term.to(torch.float64)
    return returns.to(torch.float32)


def compute_weights(
    returns: Tensor,
    group_ids: Tensor,
    beta: float,
    clip_max: float | None = None,
) -> Tensor:
    """(S,) float32 weights exp(R_i/beta) / mean_{j in group(i)} exp(R_j/beta).

    Max-shifted inside each group, so large R/beta cannot overflow; one vectorised pass
    (scatter reductions over dense group indices). ``clip_max`` clips afterwards, without
    renormalising.
    """
    if not beta > 0.0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    if returns.shape != group_ids.shape or returns.dim() != 1:
        raise ValueError(
            f"returns and group_ids must both be (S,), got {tuple(returns.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if returns.numel() == 0:
        return torch.empty(0, dtype=torch.float32)
    _, group = torch.unique(group_ids, return_inverse=True)  # (S,) dense ids 0 ... G-1
    num_groups = int(group.max()) + 1
    scaled = returns.to(torch.float64) / beta  # (S,)
    group_max = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, group, scaled, "amax", include_self=True
    )  # (G,)
    exp = torch.exp(scaled - group_max[group])  # (S,) in (0, 1], 1 at each group's max
    group_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, exp)  # (G,)
    group_size = torch.bincount(group, minlength=num_groups).to(torch.float64)  # (G,)
    weights = exp * (group_size / group_sum)[group]  # exp / group mean
    if clip_max is not None:
        weights = weights.clamp(max=clip_max)
    return weights.to(torch.float32)


def _normalisation_groups(rollouts: RolloutSet, config: WeightingConfig) -> Tensor:
    """(S,) int64 ids of the sets the weights are normalised over."""
    if config.normalize == "global":
        return torch.zeros_like(rollouts.group_ids)
    return rollouts.group_ids


def weights_for(rollouts: RolloutSet, config: WeightingConfig, override: bool = False) -> Tensor:
    """(S,) float32 weights of a ``RolloutSet``.

    The stored ``weights`` are used unless absent or ``override``; then weights come from the
    stored ``returns`` (if present and not ``override``) or from ``turn_rewards`` and the
    penalties with ``config.gamma``, normalised with ``config.beta``.
    """
    if rollouts.weights is not None and not override:
        return rollouts.weights
    if rollouts.returns is not None and not override:
        returns = rollouts.returns
    else:
        returns = compute_returns(
            rollouts.turn_rewards, config.gamma, rollouts.format_penalty, rollouts.repeat_penalty
        )
    return compute_weights(
        returns, _normalisation_groups(rollouts, config), config.beta, config.clip_max
    )


def attach_weights(rollouts: RolloutSet, config: WeightingConfig) -> RolloutSet:
    """A copy of ``rollouts`` with returns and weights computed from its rewards under
    ``config``, and γ/β (and clipping/normalisation) recorded in its metadata."""
    returns = compute_returns(
        rollouts.turn_rewards, config.gamma, rollouts.format_penalty, rollouts.repeat_penalty
    )
    weights = compute_weights(
        returns, _normalisation_groups(rollouts, config), config.beta, config.clip_max
    )
    metadata = {
        **rollouts.metadata,
        META_GAMMA: repr(float(config.gamma)),
        META_BETA: repr(float(config.beta)),
        META_NORMALIZE: config.normalize,
    }
    if config.clip_max is not None:
        metadata[META_CLIP_MAX] = repr(float(config.clip_max))
    else:
        metadata.pop(META_CLIP_MAX, None)
    return replace(rollouts, returns=returns, weights=weights, metadata=metadata)
