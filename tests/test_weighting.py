"""Returns and importance weights against a direct transcription of the DRIFT formula."""

import math

import pytest
import torch

from drift_engine.data.rollouts import RolloutSet
from drift_engine.errors import ConfigError, RolloutFormatError
from drift_engine.weighting import (
    WeightingConfig,
    attach_weights,
    compute_returns,
    compute_weights,
    format_penalty_term,
    repeat_penalty_term,
    weights_for,
)

NAN = math.nan


def reference_weights(rewards, fmt, rep, groups, gamma, beta):
    """R = sum_t gamma^(t-1) r_t + format_penalty + repeat_penalty;
    w_i = exp(R_i/beta) / mean_{j in group} exp(R_j/beta), written out in plain Python."""
    returns = []
    for r, f, p in zip(rewards, fmt, rep, strict=True):
        turns = [x for x in r if not math.isnan(x)]
        returns.append(sum(gamma ** (t - 1) * x for t, x in enumerate(turns, start=1)) + f + p)
    weights = []
    for i, g in enumerate(groups):
        members = [j for j, h in enumerate(groups) if h == g]
        shift = max(returns[j] / beta for j in members)
        mean = sum(math.exp(returns[j] / beta - shift) for j in members) / len(members)
        weights.append(math.exp(returns[i] / beta - shift) / mean)
    return returns, weights


def random_batch(seed, num_groups=5, per_group=6, max_turns=5):
    g = torch.Generator().manual_seed(seed)
    rewards, fmt, rep, groups = [], [], [], []
    for group in torch.randperm(num_groups * 3, generator=g)[:num_groups].tolist():
        for _ in range(per_group):
            n = int(torch.randint(1, max_turns + 1, (1,), generator=g))
            # Episodes stop at the first correct turn; some never get it right.
            correct = bool(torch.rand(1, generator=g) < 0.6)
            r = [0.0] * (n - 1) + [1.0 if correct else 0.0]
            rewards.append(r + [NAN] * (max_turns - n))
            fmt.append(format_penalty_term(int(torch.randint(0, n + 1, (1,), generator=g))))
            answers = [str(int(torch.randint(0, 3, (1,), generator=g))) for _ in range(n)]
            rep.append(repeat_penalty_term(answers))
            groups.append(group * 1000 - 7)  # arbitrary, sparse, negative ids
    return rewards, fmt, rep, groups


@pytest.mark.parametrize("gamma, beta", [(0.7, 0.2), (0.9, 0.1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_formula(gamma, beta, seed):
    rewards, fmt, rep, groups = random_batch(seed)
    want_r, want_w = reference_weights(rewards, fmt, rep, groups, gamma, beta)
    returns = compute_returns(
        torch.tensor(rewards, dtype=torch.float32),
        gamma,
        torch.tensor(fmt, dtype=torch.float32),
        torch.tensor(rep, dtype=torch.float32),
    )
    assert returns.dtype == torch.float32 and returns.shape == (len(rewards),)
    torch.testing.assert_close(
        returns, torch.tensor(want_r, dtype=torch.float32), rtol=1e-6, atol=1e-6
    )
    weights = compute_weights(returns, torch.tensor(groups), beta)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(
        weights, torch.tensor(want_w, dtype=torch.float32), rtol=1e-5, atol=1e-6
    )
    # Weights average 1 in every group.
    g = torch.tensor(groups)
    for group in g.unique():
        assert abs(float(weights[g == group].mean()) - 1.0) < 1e-5


def test_worked_example():
    # Group A: correct at turn 1 (R = 1), correct at turn 2 (R = 0.7), never (R = 0).
    rewards = torch.tensor([[1.0, NAN], [0.0, 1.0], [0.0, 0.0]])
    returns = compute_returns(rewards, 0.7)
    torch.testing.assert_close(returns, torch.tensor([1.0, 0.7, 0.0]))
    e = [math.exp(1 / 0.2), math.exp(0.7 / 0.2), 1.0]
    want = torch.tensor([x / (sum(e) / 3) for x in e])
    torch.testing.assert_close(compute_weights(returns, torch.tensor([3, 3, 3]), 0.2), want)


def test_large_returns_do_not_overflow():
    returns = torch.tensor([500.0, 499.0, -500.0, -501.0])
    w = compute_weights(returns, torch.tensor([0, 0, 1, 1]), beta=0.01)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 2.0, 0.0]), atol=1e-6, rtol=0)
    # A single-trajectory group always gets weight 1.
    assert compute_weights(torch.tensor([3.0]), torch.tensor([5]), 0.1).tolist() == [1.0]
    assert compute_weights(torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.1).numel() == 0


def test_clipping_does_not_renormalise():
    returns = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w = compute_weights(returns, torch.zeros(4, dtype=torch.int64), beta=0.2)
    clipped = compute_weights(returns, torch.zeros(4, dtype=torch.int64), beta=0.2, clip_max=2.0)
    assert float(w[0]) > 2.0
    torch.testing.assert_close(clipped, w.clamp(max=2.0))


def test_penalty_terms():
    assert format_penalty_term(0) == 0.0
    assert format_penalty_term(3) == pytest.approx(-0.3)
    assert repeat_penalty_term(["1", "2", "3"]) == 0.0
    assert repeat_penalty_term(["4", "4", "4", "4"]) == pytest.approx(-0.5 * (1 - 1 / 4))
    assert repeat_penalty_term(["4", None, "4"]) == pytest.approx(-0.25)  # None not counted
    assert repeat_penalty_term([None, None]) == 0.0
    assert repeat_penalty_term(["a", "a"], coef=1.0) == pytest.approx(-0.5)


def test_config_validation():
    with pytest.raises(ConfigError, match="beta"):
        WeightingConfig(beta=0.0)
    with pytest.raises(ConfigError, match="gamma"):
        WeightingConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="clip_max"):
        WeightingConfig(clip_max=-1.0)
    with pytest.raises(ConfigError, match="normalize"):
        WeightingConfig(normalize="batch")
    assert WeightingConfig(gamma=0.0).gamma == 0.0  # γ = 0: the first turn's reward alone


def test_train_config_weighting_is_the_weighting_config():
    """Training's weighting section takes WeightingConfig's ranges and defaults: one
    definition, so what the library accepts the trainer accepts (γ = 0 included)."""
    from drift_engine.train.config import WeightingSection, apply_overrides, config_from_dict

    config = config_from_dict({"out": "o", "data": {"path": "d"}, "model": {"name_or_path": "m"}})
    assert not config.validate().weighting.overrides
    assert config.weighting.resolve() == WeightingConfig()
    edge = apply_overrides(config, {"weighting.gamma": 0.0}).validate().weighting
    assert edge.resolve() == WeightingConfig(gamma=0.0) and edge.overrides
    for key, value, message in [
        ("weighting.gamma", 1.5, r"weighting.gamma must be in \[0, 1\], got 1.5"),
        ("weighting.beta", 0.0, "weighting.beta must be > 0, got 0.0"),
        ("weighting.clip_max", -1.0, "weighting.clip_max must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(config, {key: value}).validate()
        with pytest.raises(ConfigError, match=message.removeprefix("weighting.")):
            WeightingConfig(**{key.removeprefix("weighting."): value})
    assert WeightingSection(beta=0.5).resolve() == WeightingConfig(beta=0.5)


def test_gamma_beta_rule():
    from drift_engine.weighting_config import from_gamma_beta

    assert from_gamma_beta(None, None) is None
    assert from_gamma_beta(0.9, None) == WeightingConfig(gamma=0.9)
    assert from_gamma_beta(None, 0.5) == WeightingConfig(beta=0.5)
    with pytest.raises(ConfigError, match=r"gamma must be in \[0, 1\]"):
        from_gamma_beta(-0.1, 0.2)


def _rollouts():
    return RolloutSet.from_trajectories(
        [[1, 2, 3]] * 4,
        [[0, 1, 1]] * 4,
        [0, 0, 1, 1],
        [[1.0], [0.0], [0.0], [0.0]],
        format_penalty=[0.0, 0.0, -0.1, 0.0],
        repeat_penalty=[0.0, 0.0, 0.0, -0.25],
    )


def test_weights_for_and_attach():
    rs = _rollouts()
    config = WeightingConfig(gamma=0.9, beta=0.1)
    _, want = reference_weights(
        rs.turn_rewards.tolist(),
        [0.0, 0.0, -0.1, 0.0],
        [0.0, 0.0, 0.0, -0.25],
        [0, 0, 1, 1],
        0.9,
        0.1,
    )
    computed = weights_for(rs, config)
    torch.testing.assert_close(computed, torch.tensor(want, dtype=torch.float32))

    stored = attach_weights(rs, config)
    assert stored.metadata["gamma"] == "0.9" and stored.metadata["beta"] == "0.1"
    torch.testing.assert_close(stored.weights, computed)
    # Stored weights win unless overridden.
    custom = torch.tensor([4.0, 3.0, 2.0, 1.0])
    rs_custom = attach_weights(rs, config)
    rs_custom.weights = custom
    assert weights_for(rs_custom, WeightingConfig()) is custom
    overridden = weights_for(rs_custom, WeightingConfig(gamma=0.7, beta=0.2), override=True)
    _, want_default = reference_weights(
        rs.turn_rewards.tolist(),
        [0.0, 0.0, -0.1, 0.0],
        [0.0, 0.0, 0.0, -0.25],
        [0, 0, 1, 1],
        0.7,
        0.2,
    )
    torch.testing.assert_close(overridden, torch.tensor(want_default, dtype=torch.float32))
    # Global normalisation: one group over all trajectories.
    glob = weights_for(rs, WeightingConfig(normalize="global"))
    assert abs(float(glob.mean()) - 1.0) < 1e-6


def _big_rollouts(stored_weights=None):
    rs = RolloutSet.from_trajectories(
        [[1, 2, 3, 4, 5]] * 3,
        [[0, 1, 0, 2, 2]] * 3,
        [0, 0, 1],
        [[3e38, 3e38], [0.0, 0.0], [1.0, 0.0]],
    )
    if stored_weights is not None:
        rs.weights = torch.tensor(stored_weights, dtype=torch.float32)
    return rs


def test_finite_rewards_whose_sum_overflows():
    """3e38 + 3e38 is finite in float64: weights are computed there, a float32 return that
    cannot hold it is an error naming the trajectory, and no NaN weight is produced."""
    rs = _big_rollouts()
    with pytest.raises(RolloutFormatError, match="trajectory 0: its return 6e\\+38 .*overflows"):
        compute_returns(rs.turn_rewards, 1.0)
    w = weights_for(rs, WeightingConfig(gamma=1.0, beta=0.2))
    assert w.tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(RolloutFormatError, match="trajectory 0: its return"):
        attach_weights(rs, WeightingConfig(gamma=1.0))
    # float64 returns hold it.
    r64 = compute_returns(rs.turn_rewards, 1.0, dtype=torch.float64)
    assert r64.dtype == torch.float64 and float(r64[0]) == pytest.approx(6e38)


def test_exp_beyond_float64_is_stable():
    """R/beta beyond float64 (inf - inf = NaN without care): shifted before dividing."""
    returns = torch.tensor([3e38, 1e38, 0.0, -3e38], dtype=torch.float32)
    w = compute_weights(returns, torch.tensor([0, 0, 1, 1]), beta=1e-300)
    assert w.tolist() == [2.0, 0.0, 2.0, 0.0]
    w = compute_weights(torch.tensor([1.0, 1.0 - 1e-7]), torch.tensor([0, 0]), beta=1e-310)
    assert torch.isfinite(w).all() and float(w.sum()) == 2.0


def test_non_finite_returns_and_weights_are_named():
    with pytest.raises(RolloutFormatError, match="trajectory 2 \\(group 1\\) has return inf"):
        compute_weights(torch.tensor([0.0, 1.0, math.inf]), torch.tensor([0, 0, 1]), 0.2)
    with pytest.raises(RolloutFormatError, match="trajectory 1 \\(group 0\\) has return nan"):
        compute_weights(torch.tensor([0.0, NAN]), torch.tensor([0, 0]), 0.2)
    # Stored weights that would give a NaN or infinite loss normaliser never reach training.
    with pytest.raises(RolloutFormatError, match="trajectory 1 has weight nan"):
        weights_for(_big_rollouts([1.0, NAN, 1.0]), WeightingConfig())
    with pytest.raises(RolloutFormatError, match="weights sum to 6.*trajectory 0"):
        weights_for(_big_rollouts([3e38, 3e38, 1.0]), WeightingConfig())
    with pytest.raises(RolloutFormatError, match="every trajectory has weight 0"):
        weights_for(_big_rollouts([0.0, 0.0, 0.0]), WeightingConfig())
    assert weights_for(_big_rollouts([0.0, 2.0, 1.0]), WeightingConfig()).tolist() == [0, 2, 1]


def test_uniform_sets_of_the_sft_baselines():
    from dataclasses import replace

    from factories import make_rollouts

    from drift_engine.weighting import solved_trajectories, uniform_set

    rollouts = make_rollouts()
    last = torch.nan_to_num(rollouts.turn_rewards, nan=-1.0).max(dim=1).values  # (S,)
    expected = [i for i, r in enumerate(last.tolist()) if r > 0]
    assert 0 < len(expected) < rollouts.num_trajectories
    assert solved_trajectories(rollouts) == expected
    rejection = uniform_set(rollouts, solved_only=True)
    assert rejection.num_trajectories == len(expected) and rejection.returns is None
    assert rejection.weights.tolist() == [1.0] * len(expected)
    assert uniform_set(rollouts, solved_only=False).weights.tolist() == [1.0] * len(last)
    unsolved = replace(rollouts, turn_rewards=torch.zeros_like(rollouts.turn_rewards))
    with pytest.raises(ConfigError, match="nothing to train on; sample more"):
        uniform_set(unsolved, solved_only=True, hint="sample more")
