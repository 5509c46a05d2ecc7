"""Packing: invariants of packed batches, loss coefficients, planning, truncation."""

import pytest
import torch

from drift_engine.data.packing import (
    IGNORE_INDEX,
    PackedBatch,
    group_into_steps,
    pack,
    packing_stats,
    plan_micro_batches,
    plan_rollouts,
    step_normalizer,
    trajectory_windows,
)
from drift_engine.data.rollouts import RolloutSet
from drift_engine.errors import ConfigError, RolloutFormatError


def make_rollouts(num=23, seed=0, max_turns=3) -> RolloutSet:
    """Trajectories [prompt][answer 1][feedback][answer 2]... with awkward lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens, turns, groups, rewards = [], [], [], []
    for i in range(num):
        n = int(torch.randint(1, max_turns + 1, (1,), generator=g))
        toks, tids = [], []
        for k in range(1, n + 1):
            ctx = int(torch.randint(2, 9, (1,), generator=g))
            ans = int(torch.randint(1, 7, (1,), generator=g))
            toks += torch.randint(0, 1000, (ctx + ans,), generator=g).tolist()
            tids += [0] * ctx + [k] * ans
        tokens.append(toks)
        turns.append(tids)
        groups.append(i // 4)
        rewards.append([0.0] * (n - 1) + [1.0])
    return RolloutSet.from_trajectories(tokens, turns, groups, rewards)


def reference_targets(rs: RolloutSet, i: int, train_turns: str) -> list[tuple[int, int]]:
    """(position, target token) pairs trained for trajectory i, from the definition."""
    sl = rs.trajectory_slice(i)
    toks, turns = rs.input_ids[sl].tolist(), rs.turn_ids[sl].tolist()
    last = max(turns)
    out = []
    for p in range(len(toks) - 1):
        t = turns[p + 1]
        if t > 0 and (train_turns == "all" or t == last):
            out.append((p, toks[p + 1]))
    return out


@pytest.mark.parametrize("train_turns", ["last", "all"])
def test_pack_layout_and_labels(train_turns):
    rs = make_rollouts()
    weights = torch.rand(rs.num_trajectories, generator=torch.Generator().manual_seed(1)) + 0.5
    idx = [5, 0, 17, 3]
    b = pack(rs, idx, weights, train_turns=train_turns, loss_mode="trajectory")
    lengths = [rs.lengths()[i].item() for i in idx]
    T = sum(lengths)
    assert b.input_ids.shape == (1, T) and b.input_ids.dtype == torch.int64
    assert b.position_ids.shape == (1, T) and b.position_ids.dtype == torch.int64
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0] + list(
        torch.tensor(lengths).cumsum(0).tolist()
    )
    assert b.labels.shape == (T,) and b.labels.dtype == torch.int64
    assert b.token_weights.shape == (T,) and b.token_weights.dtype == torch.float32
    assert b.trajectory_index.tolist() == idx and b.num_trajectories == 4 and b.num_tokens == T
    assert b.max_seqlen == max(lengths)
    n_trained = 0
    for j, i in enumerate(idx):
        lo, hi = b.cu_seqlens[j].item(), b.cu_seqlens[j + 1].item()
        # Tokens copied exactly, positions restart at 0.
        assert b.input_ids[0, lo:hi].tolist() == rs.input_ids[rs.trajectory_slice(i)].tolist()
        assert b.position_ids[0, lo:hi].tolist() == list(range(hi - lo))
        want = reference_targets(rs, i, train_turns)
        got = [
            (p, b.labels[lo + p].item()) for p in range(hi - lo) if b.labels[lo + p] != IGNORE_INDEX
        ]
        assert got == want
        assert b.labels[hi - 1] == IGNORE_INDEX
        # trajectory loss = w_i × token mean: coefficients sum to w_i over the trajectory.
        tw = b.token_weights[lo:hi]
        assert torch.equal(tw != 0, b.labels[lo:hi] != IGNORE_INDEX)
        torch.testing.assert_close(tw.sum(), weights[i])
        n_trained += len(want)
    assert b.num_trained_tokens == n_trained


def test_loss_modes_match_their_definitions():
    rs = make_rollouts()
    weights = torch.rand(rs.num_trajectories, generator=torch.Generator().manual_seed(2)) + 0.1
    micro = [[1, 2, 3], [4, 9], [10]]
    ce = {}  # per-token CE stand-in, fixed per (trajectory, position)
    g = torch.Generator().manual_seed(3)

    def summed(batch: PackedBatch) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float64)
        for j, i in enumerate(batch.trajectory_index.tolist()):
            lo, hi = batch.cu_seqlens[j].item(), batch.cu_seqlens[j + 1].item()
            if i not in ce:
                ce[i] = torch.rand(hi - lo, generator=g, dtype=torch.float64)
            loss = loss + (batch.token_weights[lo:hi].double() * ce[i]).sum()
        return loss

    def per_traj(i):
        """(CE of the trained positions, their count) from the label definition."""
        positions = [p for p, _ in reference_targets(rs, i, "last")]
        return ce[i][positions], len(positions)

    results = {}
    for mode in ("trajectory", "weighted", "token"):
        batches = [pack(rs, m, weights, loss_mode=mode) for m in micro]
        total = sum(summed(b) for b in batches) / step_normalizer(batches, mode)
        results[mode] = total
    rows = [i for m in micro for i in m]
    token_mean = {i: per_traj(i)[0].mean() for i in rows}
    w = weights.double()
    want_traj = sum(w[i] * token_mean[i] for i in rows) / len(rows)
    want_weighted = sum(w[i] * token_mean[i] for i in rows) / sum(w[i] for i in rows)
    want_token = sum(w[i] * per_traj(i)[0].sum() for i in rows) / sum(per_traj(i)[1] for i in rows)
    torch.testing.assert_close(results["trajectory"], want_traj)
    torch.testing.assert_close(results["weighted"], want_weighted)
    torch.testing.assert_close(results["token"], want_token.double())
    with pytest.raises(ConfigError, match="loss_mode"):
        pack(rs, [0], weights, loss_mode="mean")


def test_plan_invariants_and_determinism():
    lengths = torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(4))
    budget = 1000
    plan = plan_micro_batches(lengths, budget, seed=7)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(500))  # every trajectory exactly once
    assert all(int(lengths[b].sum()) <= budget for b in plan)
    assert plan == plan_micro_batches(lengths, budget, seed=7)
    assert plan != plan_micro_batches(lengths, budget, seed=8)
    # Best-fit decreasing packs tightly: total / budget is a lower bound on the batch count.
    lower = -(-int(lengths.sum()) // budget)
    assert len(plan) <= lower + 3
    unshuffled = plan_micro_batches(lengths, budget, seed=7, shuffle=False)
    assert sorted(i for b in unshuffled for i in b) == list(range(500))
    with pytest.raises(ConfigError, match="more than the budget"):
        plan_micro_batches(lengths, 100, seed=0)


def test_short_trajectories_fill_their_batches():
    # 12-28-token trajectories at a 16k budget: a batch holds ~800 of them, more than any
    # fixed count of trajectories per packing window would allow.
    lengths = torch.randint(12, 29, (20_000,), generator=torch.Generator().manual_seed(1))
    budget = 16384
    plan = plan_micro_batches(lengths, budget, seed=3)
    assert sorted(i for b in plan for i in b) == list(range(lengths.numel()))
    assert all(int(lengths[b].sum()) <= budget for b in plan)
    assert max(len(b) for b in plan) > 512
    efficiency = int(lengths.sum()) / (len(plan) * budget)
    assert efficiency >= 0.95
    assert plan == plan_micro_batches(lengths, budget, seed=3)


@pytest.mark.parametrize("kind", ["short", "lognormal", "wide"])
def test_efficiency_does_not_depend_on_the_window(kind):
    g = torch.Generator().manual_seed(2)
    budget = 4096
    if kind == "short":
        lengths = torch.randint(3, 9, (30_000,), generator=g)
    elif kind == "lognormal":
        lengths = torch.empty(6000).log_normal_(5.5, 0.7, generator=g).round().clamp(1, budget)
    else:
        lengths = torch.randint(1, budget // 2, (3000,), generator=g)
    lengths = lengths.to(torch.int64)
    lower = -(-int(lengths.sum()) // budget)  # no plan has fewer batches
    for window_batches in (8, 64, 512):
        plan = plan_micro_batches(lengths, budget, seed=0, window_batches=window_batches)
        assert sorted(i for b in plan for i in b) == list(range(lengths.numel()))
        assert all(int(lengths[b].sum()) <= budget for b in plan)
        assert len(plan) <= lower * 1.02 + 1, (window_batches, len(plan), lower)


def test_plan_rollouts_packs_every_token_once():
    rs = make_rollouts(num=40)
    budget = 64
    plan, stats = plan_rollouts(rs, budget, seed=0)
    weights = torch.ones(rs.num_trajectories)
    seen = []
    for m in plan:
        b = pack(rs, m, weights, max_tokens=budget)
        assert b.num_tokens <= budget
        seen += b.trajectory_index.tolist()
    assert sorted(seen) == list(range(rs.num_trajectories))
    assert stats.num_truncated == 0 and stats.truncated_tokens == 0
    assert stats.real_tokens == rs.num_tokens and stats.num_batches == len(plan)
    assert stats.efficiency == pytest.approx(rs.num_tokens / (len(plan) * budget))
    assert 0.7 < stats.efficiency <= 1.0
    assert "packing efficiency" in stats.summary()


def test_plan_carries_its_truncation_windows(monkeypatch):
    import drift_engine.data.packing as packing

    rs = make_rollouts(num=30, max_turns=3)
    budget = 12  # some trajectories are truncated
    plan, stats = plan_rollouts(rs, budget, seed=1, indices=range(3, 30))
    assert stats.num_truncated > 0
    weights = torch.rand(rs.num_trajectories, generator=torch.Generator().manual_seed(0))
    expected = [pack(rs, list(m), weights, max_tokens=budget) for m in plan]  # recomputed

    calls = []
    real = packing.trajectory_windows
    monkeypatch.setattr(
        packing, "trajectory_windows", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for m, want in zip(plan, expected, strict=True):
        got = pack(rs, m, weights, max_tokens=budget)  # the plan's own windows
        for name in ("input_ids", "position_ids", "cu_seqlens", "labels", "token_weights"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert calls == []
    # Other settings than the plan's: the windows are computed for them.
    pack(rs, plan[0], weights, max_tokens=budget + 5)
    pack(rs, plan[0][:1], weights, max_tokens=budget)  # a plain list
    assert len(calls) == 2


def test_truncation_keeps_trained_turn_whole():
    # 20 tokens: prompt 6, answer 1 (4), feedback 5, answer 2 (3), trailing context 2.
    turns = [0] * 6 + [1] * 4 + [0] * 5 + [2] * 3 + [0] * 2
    toks = list(range(100, 120))
    rs = RolloutSet.from_trajectories(
        [toks, toks[:5]], [turns, [0, 1, 1, 1, 1]], [0, 1], [[0.0, 1.0], [1.0]]
    )
    weights = torch.ones(2)
    # Budget 8: the tail fits with the trained turn, so only the left is cut.
    win = trajectory_windows(rs, train_turns="last", max_tokens=8)
    assert win.start.tolist() == [12, 0] and win.end.tolist() == [20, 5]
    assert win.truncated.tolist() == [True, False]
    # Budget 5: the tail (no loss depends on it) goes too; the token before the trained
    # turn is kept so that the turn's first token is predicted.
    b = pack(rs, [0], weights, max_tokens=5)
    assert b.input_ids[0].tolist() == toks[13:18]
    assert b.position_ids[0].tolist() == list(range(5))
    assert [t for t in b.labels.tolist() if t != IGNORE_INDEX] == toks[15:18]
    # Budget 16 keeps the tail: cut only from the left.
    b = pack(rs, [0], weights, max_tokens=16)
    assert b.input_ids[0].tolist() == toks[4:20]
    # train_turns="all": both turns (and the token before) must fit.
    win = trajectory_windows(rs, train_turns="all", max_tokens=14)
    assert win.start.tolist()[0] == 4 and win.end.tolist()[0] == 18
    with pytest.raises(ConfigError, match="trajectory 0 cannot fit the token budget 12"):
        trajectory_windows(rs, train_turns="all", max_tokens=12)
    with pytest.raises(ConfigError, match="cannot fit"):
        pack(rs, [0], weights, max_tokens=3)
    plan, stats = plan_rollouts(rs, 8, seed=0)
    assert stats.num_truncated == 1 and stats.truncated_tokens == 12
    assert stats.real_tokens == 8 + 5 and "truncated" in stats.summary()
    assert sorted(i for m in plan for i in m) == [0, 1]


def test_pack_errors():
    rs = make_rollouts(num=4)
    with pytest.raises(ConfigError, match="one value per trajectory"):
        pack(rs, [0], torch.ones(3))
    with pytest.raises(ConfigError, match="max_tokens"):
        pack(rs, [0, 1, 2, 3], torch.ones(4), max_tokens=int(rs.lengths().max()))
    untrained = RolloutSet.from_trajectories([[1, 2, 3]], [[0, 0, 0]], [0], [[]])
    with pytest.raises(RolloutFormatError, match="no trained token"):
        pack(untrained, [0], torch.ones(1))


def test_steps_and_device_move():
    plan = [[0], [1, 2], [3], [4], [5]]
    assert group_into_steps(plan, 2) == [[[0], [1, 2]], [[3], [4]], [[5]]]
    assert group_into_steps(plan, 2, drop_last=True) == [[[0], [1, 2]], [[3], [4]]]
    with pytest.raises(ConfigError):
        group_into_steps(plan, 0)
    rs = make_rollouts(num=3)
    b = pack(rs, [0, 1], torch.tensor([1.0, 2.0, 3.0]))
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and torch.equal(moved.labels, b.labels)
    assert moved.num_trained_tokens == b.num_trained_tokens
    assert b.normalizer_term("weighted") == 3.0 and b.normalizer_term("trajectory") == 2.0
    assert b.normalizer_term("token") == b.num_trained_tokens


def test_packing_stats_direct():
    rs = make_rollouts(num=6)
    win = trajectory_windows(rs)
    stats = packing_stats([[0, 1], [2, 3, 4, 5]], 100, win)
    assert stats.real_tokens == rs.num_tokens and stats.num_trajectories == 6
    assert stats.efficiency == pytest.approx(rs.num_tokens / 200)
