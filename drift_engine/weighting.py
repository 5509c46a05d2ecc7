"""Returns and DRIFT importance weights.

For trajectory i with turn rewards r_t (t = 1 ... n_i)::

    R_i = sum_t gamma^(t-1) r_t + format_penalty_i + repeat_penalty_i

and within each prompt group g::

    w_i = exp(R_i / beta) / mean_{j in g} exp(R_j / beta)

the self-normalised importance weights of the KL-regularised optimum
pi* ∝ pi_ref · exp(R / beta); they average 1 in every group. Both are computed in float64,
the weights as exp((R_i - max R) / beta), so finite inputs never give a NaN or infinite
weight; what cannot be represented is an error naming the trajectory. The penalties are stored
already signed: ``format_penalty_term`` (-0.1 per unparseable turn) and
``repeat_penalty_term`` (-lambda · (1 - unique answers / answers), lambda = 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from drift_engine.data.rollouts import (
    META_BETA,
    META_CLIP_MAX,
    META_GAMMA,
    META_NORMALIZE,
    RolloutSet,
)
from drift_engine.errors import ConfigError, RolloutFormatError
from drift_engine.weighting_config import WeightingConfig

REPEAT_PENALTY_COEF = 0.5
FORMAT_PENALTY_PER_TURN = -0.1


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
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(S,) returns R = sum_t gamma^(t-1) r_t + penalties; NaN rewards are absent turns.

    Summed in float64 and returned in ``dtype``; a return that does not fit ``dtype`` (finite
    rewards whose sum overflows, e.g. 3e38 + 3e38 in float32) is an error naming the
    trajectory.
    """
    rewards = turn_rewards.to(torch.float64)  # (S, K)
    discount = gamma ** torch.arange(rewards.shape[1], dtype=torch.float64)  # (K,) gamma^(t-1)
    returns = torch.nansum(rewards * discount, dim=1)  # (S,)
    for term in (format_penalty, repeat_penalty):
        if term is not None:
            returns = returns + term.to(torch.float64)
    return _narrow(returns, dtype)


def _narrow(returns: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 ``returns`` in ``dtype``; one that overflows it is an error naming the trajectory."""
    out = returns.to(dtype)
    bad = torch.isinf(out) & torch.isfinite(returns)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise RolloutFormatError(
            f"trajectory {i}: its return {float(returns[i]):.4g} (discounted rewards plus "
            f"penalties) overflows {str(dtype).removeprefix('torch.')} ({int(bad.sum())} "
            f"trajectories do); rescale the rewards so that returns stay within "
            f"±{torch.finfo(dtype).max:.3g}"
        )
    return out


def compute_weights(
    returns: Tensor,
    group_ids: Tensor,
    beta: float,
    clip_max: float | None = None,
) -> Tensor:
    """(S,) float32 weights exp(R_i/beta) / mean_{j in group(i)} exp(R_j/beta).

    Computed in float64 as exp((R_i - max_g R) / beta): the shift comes before the division,
    so neither a large R/beta nor a tiny beta can overflow, and every weight lies in
    [0, group size]. One vectorised pass (scatter reductions over dense group indices).
    Non-finite returns are an error naming the trajectory. ``clip_max`` clips afterwards,
    without renormalising.
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
    returns = returns.to(torch.float64)
    bad = ~torch.isfinite(returns)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise RolloutFormatError(
            f"trajectory {i} (group {int(group_ids[i])}) has return {float(returns[i])}; "
            "returns must be finite to compute weights (recompute them from the rewards)"
        )
    _, group = torch.unique(group_ids, return_inverse=True)  # (S,) dense ids 0 ... G-1
    num_groups = int(group.max()) + 1
    group_max = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, group, returns, "amax", include_self=True
    )  # (G,)
    exp = torch.exp((returns - group_max[group]) / beta)  # (S,) in [0, 1], 1 at each group's max
    group_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, exp)  # (G,) >= 1
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


def _returns_from_rewards(rollouts: RolloutSet, config: WeightingConfig) -> Tensor:
    """(S,) float64 returns of the stored rewards and penalties under ``config.gamma``."""
    return compute_returns(
        rollouts.turn_rewards,
        config.gamma,
        rollouts.format_penalty,
        rollouts.repeat_penalty,
        dtype=torch.float64,
    )


def _weights_from_returns(rollouts: RolloutSet, config: WeightingConfig, returns: Tensor) -> Tensor:
    """(S,) weights of ``returns`` (S,), normalised over the sets ``config`` names."""
    groups = _normalisation_groups(rollouts, config)
    return compute_weights(returns, groups, config.beta, config.clip_max)


def weights_for(rollouts: RolloutSet, config: WeightingConfig, override: bool = False) -> Tensor:
    """(S,) float32 weights of a ``RolloutSet``, checked before they reach training.

    The stored ``weights`` are used unless absent or ``override``; then weights come from the
    stored ``returns`` (if present and not ``override``) or from ``turn_rewards`` and the
    penalties with ``config.gamma``, normalised with ``config.beta``. Weights that are not
    finite and non-negative, that are all 0, or whose sum overflows float32 (the weighted
    loss divides by sums of them) are an error naming a trajectory.
    """
    if rollouts.weights is not None and not override:
        weights = rollouts.weights
    else:
        if rollouts.returns is not None and not override:
            returns = rollouts.returns
        else:
            returns = _returns_from_rewards(rollouts, config)
        weights = _weights_from_returns(rollouts, config, returns)
    _check_weights(weights)
    return weights


def _check_weights(weights: Tensor) -> None:
    if weights.numel() == 0:
        return
    w = weights.to(torch.float64)
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise RolloutFormatError(
            f"trajectory {i} has weight {float(w[i])}; weights must be finite and >= 0 "
            "(recompute them from the rewards: train with --gamma or --beta)"
        )
    total = float(w.sum())
    if total == 0.0:
        raise RolloutFormatError(
            "every trajectory has weight 0, so training would learn nothing; recompute the "
            "weights from the rewards (train with --gamma or --beta)"
        )
    if total > torch.finfo(torch.float32).max:
        i = int(w.argmax())
        raise RolloutFormatError(
            f"the weights sum to {total:.3g}, beyond float32 (largest: trajectory {i}, "
            f"{float(w[i]):.3g}); importance weights average 1 per group, so recompute them "
            "from the rewards (train with --gamma or --beta)"
        )


def attach_weights(
    rollouts: RolloutSet, config: WeightingConfig, returns: Tensor | None = None
) -> RolloutSet:
    """A copy of ``rollouts`` with returns and weights computed from its rewards under
    ``config``, and γ/β (and clipping/normalisation) recorded in its metadata.

    ``returns`` (S,), when given, replaces the returns computed from the stored float32
    rewards and penalties (e.g. float64 returns of the values the set was converted from);
    the weights come from it at its precision, the stored returns are its float32 values.
    """
    if returns is None:
        returns = _returns_from_rewards(rollouts, config)
    weights = _weights_from_returns(rollouts, config, returns)
    stored = _narrow(returns.to(torch.float64), torch.float32)
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
    return replace(rollouts, returns=stored, weights=weights, metadata=metadata)


def solved_trajectories(rollouts: RolloutSet) -> list[int]:
    """Indices of the trajectories that earned a positive reward at some turn."""
    solved = torch.nan_to_num(rollouts.turn_rewards, nan=0.0).gt(0).any(dim=1)  # (S,)
    return solved.nonzero().flatten().tolist()


def uniform_set(rollouts: RolloutSet, *, solved_only: bool, hint: str = "") -> RolloutSet:
    """The SFT baselines' training set, every trajectory of weight 1 and no returns:
    rejection sampling (``solved_only``: the solved trajectories; ConfigError, ending with
    ``hint``, when none is) or plain SFT (all of them)."""
    if solved_only:
        keep = solved_trajectories(rollouts)
        if not keep:
            raise ConfigError(
                "no rollout solved its problem, so rejection sampling has nothing to train on"
                + (f"; {hint}" if hint else "")
            )
        rollouts = rollouts.select(keep)
    return replace(rollouts, returns=None, weights=torch.ones(rollouts.num_trajectories))
