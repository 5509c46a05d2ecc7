"""Token-budget packing of trajectories into variable-length micro-batches (no padding).

A micro-batch is one sequence of concatenated trajectories (``input_ids`` of shape (1, T)),
with ``cu_seqlens`` boundaries for varlen attention and position ids restarting at 0 in
each trajectory, so nothing attends across trajectories.

Loss semantics. ``labels[p]`` is the next token ``input_ids[p + 1]`` where that token is
trained, else -100 (also at each trajectory's last position). ``token_weights[p]`` is the
coefficient of position p's cross-entropy in the summed loss; the trainer sums
``token_weights · CE`` over every micro-batch of an optimizer step and divides by
``step_normalizer`` of that step's batches:

=============  ====================  ============================  ================================
loss_mode      token_weights         normaliser (global to step)   step loss
=============  ====================  ============================  ================================
"trajectory"   w_i / n_i             number of trajectories        mean_i  w_i · mean_t CE_i,t
"weighted"     w_i / n_i             Σ_i w_i                       Σ_i w_i · mean_t CE_i,t / Σ_i w_i
"token"        w_i                   number of trained tokens      Σ_i,t w_i · CE_i,t / Σ_i n_i
=============  ====================  ============================  ================================

with n_i the number of trained tokens of trajectory i. "trajectory" is DRIFT's loss.
Because the normaliser is global to the step, gradient accumulation does not change it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from drift_engine.data.rollouts import RolloutSet, TrainTurns
from drift_engine.errors import ConfigError, RolloutFormatError
from drift_engine.kernels.labels import IGNORE_INDEX

LossMode = Literal["trajectory", "weighted", "token"]
LOSS_MODES = ("trajectory", "weighted", "token")


@dataclass
class PackedBatch:
    """B trajectories packed into one sequence of T tokens."""

    input_ids: Tensor  # (1, T) int64
    position_ids: Tensor  # (1, T) int64, 0 at each trajectory's first token
    cu_seqlens: Tensor  # (B+1,) int32, 0 ... T
    max_seqlen: int
    labels: Tensor  # (T,) int64 next-token targets, IGNORE_INDEX where not trained
    token_weights: Tensor  # (T,) float32 per-token loss coefficient, 0 where not trained
    trajectory_index: Tensor  # (B,) int64 rows of the RolloutSet
    trajectory_weights: Tensor  # (B,) float32 importance weight w_i of each trajectory
    num_trajectories: int
    num_tokens: int
    num_trained_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)

    def normalizer_term(self, loss_mode: LossMode = "trajectory") -> float:
        """This batch's share of its step's loss normaliser (see ``step_normalizer``)."""
        _check_loss_mode(loss_mode)
        if loss_mode == "trajectory":
            return float(self.num_trajectories)
        if loss_mode == "weighted":
            return float(self.trajectory_weights.sum(dtype=torch.float64))
        return float(self.num_trained_tokens)


def step_normalizer(batches: Sequence[PackedBatch], loss_mode: LossMode = "trajectory") -> float:
    """The divisor of an optimizer step's summed loss: trajectory count, Σ w or trained-token
    count over all its micro-batches (sum it across data-parallel ranks too)."""
    return sum(b.normalizer_term(loss_mode) for b in batches)


def _check_loss_mode(loss_mode: str) -> None:
    if loss_mode not in LOSS_MODES:
        raise ConfigError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")


def _check_train_turns(train_turns: str) -> None:
    if train_turns not in ("last", "all"):
        raise ConfigError(f"train_turns must be 'last' or 'all', got {train_turns!r}")


# ---- which tokens of each trajectory are packed -------------------------------------------


def _gather_ranges(starts: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the ranges [starts[b], starts[b] + lengths[b]) and, for each index, its
    range b. Both (sum(lengths),) int64."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    index = torch.arange(int(cu[-1])) + (starts - cu[:-1])[owner]
    return index, owner


def _trained(turns: Tensor, owner: Tensor, num: int, train_turns: TrainTurns) -> Tensor:
    """(N,) bool trained-token mask of gathered tokens; ``turns`` (N,) int64, ``owner`` (N,)
    the trajectory (0 ... num-1) of each token, each trajectory's last turn gathered whole."""
    if train_turns == "all":
        return turns > 0
    last = torch.zeros(num, dtype=torch.int64).scatter_reduce_(
        0, owner, turns, "amax", include_self=True
    )  # (num,) last assistant turn id
    return (turns > 0) & (turns == last[owner])


@dataclass(frozen=True)
class TrajectoryWindows:
    """The token range [start, end) of each trajectory that is packed (relative to the
    trajectory's first token), after left truncation to the budget ``max_tokens`` with
    ``train_turns`` trained."""

    start: Tensor  # (N,) int64
    end: Tensor  # (N,) int64
    truncated: Tensor  # (N,) bool: tokens were dropped
    full_lengths: Tensor  # (N,) int64 lengths before truncation
    max_tokens: int | None = None
    train_turns: TrainTurns = "last"

    @property
    def lengths(self) -> Tensor:
        return self.end - self.start

    def take(self, positions: Tensor) -> TrajectoryWindows:
        """The windows at ``positions`` (int64 indices into these windows)."""
        return TrajectoryWindows(
            self.start[positions],
            self.end[positions],
            self.truncated[positions],
            self.full_lengths[positions],
            self.max_tokens,
            self.train_turns,
        )


class MicroBatch(list):
    """A planned micro-batch: its rollout rows (a list of int, usable wherever the rows are)
    and the truncation windows the plan measured them with, indexed by rollout row, which
    ``pack`` uses instead of computing them again."""

    __slots__ = ("windows",)

    def __init__(self, rows: Sequence[int], windows: TrajectoryWindows):
        super().__init__(rows)
        self.windows = windows


def trajectory_windows(
    rollouts: RolloutSet,
    indices: Sequence[int] | Tensor | None = None,
    *,
    train_turns: TrainTurns = "last",
    max_tokens: int | None = None,
) -> TrajectoryWindows:
    """Token windows of trajectories ``indices`` (default all) fitting ``max_tokens``.

    A trajectory longer than ``max_tokens`` first loses its tail after the last trained token
    (no loss depends on it) and then tokens from the left, keeping the trained turn(s) whole
    together with the token before the first trained one (which predicts it). If that span
    alone exceeds ``max_tokens``, a ``ConfigError`` says so.
    """
    _check_train_turns(train_turns)
    if indices is None:
        idx = torch.arange(rollouts.num_trajectories)
    else:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    starts = rollouts.cu_seqlens[idx]  # (N,)
    full = rollouts.cu_seqlens[idx + 1] - starts  # (N,)
    if max_tokens is None or idx.numel() == 0 or int(full.max()) <= max_tokens:
        zero = torch.zeros_like(full)
        return TrajectoryWindows(
            zero,
            full.clone(),
            torch.zeros_like(full, dtype=torch.bool),
            full,
            max_tokens,
            train_turns,
        )
    if max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")

    # Only trajectories over the budget need their trained span.
    long = torch.nonzero(full > max_tokens).flatten()  # (L,) positions in idx
    tok, owner = _gather_ranges(starts[long], full[long])
    turns = rollouts.turn_ids[tok].to(torch.int64)
    trained = _trained(turns, owner, long.numel(), train_turns)
    first_tok = torch.zeros(long.numel() + 1, dtype=torch.int64)
    torch.cumsum(full[long], 0, out=first_tok[1:])
    rel = torch.arange(tok.numel()) - first_tok[:-1][owner]  # position inside the trajectory
    trained &= rel > 0  # the first token has no prediction
    big = torch.iinfo(torch.int64).max
    first_trained = torch.full((long.numel(),), big).scatter_reduce_(
        0, owner[trained], rel[trained], "amin", include_self=True
    )
    last_trained = torch.full((long.numel(),), -1).scatter_reduce_(
        0, owner[trained], rel[trained], "amax", include_self=True
    )
    if bool((last_trained < 0).any()):
        row = int(idx[long[int(torch.nonzero(last_trained < 0)[0])]])
        raise RolloutFormatError(
            f"trajectory {row} has no trained token under train_turns={train_turns!r}; "
            "run validate_rollouts and drop such trajectories"
        )
    need_start = first_trained - 1  # the token that predicts the first trained token
    need_end = last_trained + 1
    span = need_end - need_start
    if bool((span > max_tokens).any()):
        j = int(torch.nonzero(span > max_tokens)[0])
        raise ConfigError(
            f"trajectory {int(idx[long[j]])} cannot fit the token budget {max_tokens}: its "
            f"trained turn{'s' if train_turns == 'all' else ''} and the token before span "
            f"{int(span[j])} tokens; raise the token budget (--batch-tokens)"
            + (" or train only the last turn (train_turns='last')" if train_turns == "all" else "")
        )
    long_full = full[long]
    # Keep the tail only while it fits with the trained span, then cut from the left.
    end = torch.where(long_full - need_start <= max_tokens, long_full, need_end)
    start = (end - max_tokens).clamp(min=0)

    out_start = torch.zeros_like(full)
    out_end = full.clone()
    out_start[long] = start
    out_end[long] = end
    return TrajectoryWindows(out_start, out_end, full > max_tokens, full, max_tokens, train_turns)


# ---- packing ------------------------------------------------------------------------------


def pack(
    rollouts: RolloutSet,
    indices: Sequence[int] | Tensor,
    weights: Tensor,
    *,
    train_turns: TrainTurns = "last",
    loss_mode: LossMode = "trajectory",
    max_tokens: int | None = None,
) -> PackedBatch:
    """Pack trajectories ``indices`` (rows of ``rollouts``, in that order) into one batch.

    ``weights`` (S,) float32 holds every trajectory's importance weight (e.g.
    ``drift_engine.weighting.weights_for``). With ``max_tokens``, trajectories longer than it
    are truncated as in ``trajectory_windows`` and the packed total must fit it. A
    ``MicroBatch`` of ``plan_rollouts`` planned with the same ``max_tokens`` and
    ``train_turns`` brings its windows along.
    """
    _check_loss_mode(loss_mode)
    _check_train_turns(train_turns)
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (B,)
    if idx.numel() == 0:
        raise ConfigError("pack needs at least one trajectory index")
    if weights.shape != (rollouts.num_trajectories,):
        raise ConfigError(
            f"weights must hold one value per trajectory of the rollout set, shape "
            f"({rollouts.num_trajectories},), got {tuple(weights.shape)}"
        )
    planned = indices.windows if isinstance(indices, MicroBatch) else None
    if (
        planned is not None
        and planned.max_tokens == max_tokens
        and planned.train_turns == train_turns
        and planned.start.numel() == rollouts.num_trajectories
    ):
        windows = planned.take(idx)
    else:
        windows = trajectory_windows(rollouts, idx, train_turns=train_turns, max_tokens=max_tokens)
    lengths = windows.lengths  # (B,)
    total = int(lengths.sum())
    if max_tokens is not None and total > max_tokens:
        raise ConfigError(
            f"{idx.numel()} trajectories hold {total} tokens, more than max_tokens={max_tokens}; "
            "plan micro-batches with plan_micro_batches"
        )
    B = idx.numel()
    tok, owner = _gather_ranges(rollouts.cu_seqlens[idx] + windows.start, lengths)  # (T,), (T,)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])

    input_ids = rollouts.input_ids[tok].to(torch.int64)  # (T,)
    position_ids = torch.arange(total) - cu[:-1][owner]  # (T,)
    # A window always holds the trajectory's last trained turn whole, so the last turn id
    # inside the window is the trajectory's.
    trained = _trained(rollouts.turn_ids[tok].to(torch.int64), owner, B, train_turns)  # (T,)

    # Position p predicts token p + 1: trained when token p + 1 is trained and in the same
    # trajectory (p is not its trajectory's last position).
    is_last = torch.zeros(total, dtype=torch.bool)
    is_last[cu[1:] - 1] = True
    target_trained = torch.zeros(total, dtype=torch.bool)
    target_trained[:-1] = trained[1:]
    target_trained &= ~is_last
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
    labels[:-1] = torch.where(target_trained[:-1], input_ids[1:], IGNORE_INDEX)

    n_trained = torch.zeros(B, dtype=torch.int64).index_add_(
        0, owner, target_trained.to(torch.int64)
    )  # (B,)
    if bool((n_trained == 0).any()):
        row = int(idx[int(torch.nonzero(n_trained == 0)[0])])
        raise RolloutFormatError(
            f"trajectory {row} has no trained token under train_turns={train_turns!r}; "
            "run validate_rollouts and drop such trajectories"
        )
    w = weights[idx].to(torch.float32)  # (B,)
    if loss_mode == "token":
        coef = w  # (B,)
    else:
        coef = w / n_trained.to(torch.float32)  # (B,) token-mean within each trajectory
    token_weights = torch.where(target_trained, coef[owner], 0.0).to(torch.float32)  # (T,)

    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=int(lengths.max()),
        labels=labels,
        token_weights=token_weights,
        trajectory_index=idx.clone(),
        trajectory_weights=w,
        num_trajectories=B,
        num_tokens=total,
        num_trained_tokens=int(n_trained.sum()),
    )


# ---- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingStats:
    """How well a plan fills its micro-batches."""

    num_trajectories: int
    num_batches: int
    budget_tokens: int
    real_tokens: int  # tokens packed (after truncation)
    num_truncated: int  # trajectories truncated to fit the budget
    truncated_tokens: int  # tokens dropped by truncation

    @property
    def efficiency(self) -> float:
        """real tokens / (num_batches × budget): 1.0 means every batch is full."""
        capacity = self.num_batches * self.budget_tokens
        return self.real_tokens / capacity if capacity else 0.0

    def summary(self) -> str:
        text = (
            f"{self.num_trajectories} trajectories, {self.real_tokens} tokens in "
            f"{self.num_batches} micro-batches of {self.budget_tokens} tokens "
            f"(packing efficiency {self.efficiency:.1%})"
        )
        if self.num_truncated:
            text += (
                f"; {self.num_truncated} trajectories truncated from the left "
                f"({self.truncated_tokens} tokens dropped)"
            )
        return text


def plan_micro_batches(
    lengths: Sequence[int] | Tensor,
    budget_tokens: int,
    seed: int,
    shuffle: bool = True,
    window_batches: int = 64,
) -> list[list[int]]:
    """Group trajectories (by index into ``lengths``) into micro-batches of at most
    ``budget_tokens`` tokens.

    The trajectories are shuffled with ``seed`` (unless ``shuffle`` is False) and cut into
    windows of consecutive trajectories holding about ``window_batches`` budgets of tokens
    each (so a window holds as many trajectories as its batches can take, however short
    they are). Each window is packed best-fit decreasing (each trajectory, longest first,
    goes into the open batch it fills most tightly); the batches a window leaves with room
    (at most ``window_batches`` of them, the emptiest) stay open for the next window, so
    only the last window's leftovers end under-filled. The batches are then shuffled with
    the same seed. The result is random in order and composition, and identical for
    identical arguments.
    """
    sizes = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if budget_tokens <= 0:
        raise ConfigError(f"budget_tokens must be positive, got {budget_tokens}")
    if window_batches <= 0:
        raise ConfigError(f"window_batches must be positive, got {window_batches}")
    if sizes.numel() and int(sizes.max()) > budget_tokens:
        i = int(sizes.argmax())
        raise ConfigError(
            f"trajectory {i} has {int(sizes[i])} tokens, more than the budget {budget_tokens}; "
            "plan with the truncated lengths (trajectory_windows(...).lengths) or raise the budget"
        )
    if sizes.numel() == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    order = (
        torch.randperm(sizes.numel(), generator=generator)
        if shuffle
        else torch.arange(sizes.numel())
    )
    # Window of each trajectory (in shuffled order) from the tokens before it; then one
    # stable sort gives every window's trajectories longest first, windows in order.
    ordered = sizes[order]
    before = torch.cumsum(ordered, 0) - ordered
    window_of = torch.div(before, window_batches * budget_tokens, rounding_mode="floor")
    key = window_of * (budget_tokens + 1) + (budget_tokens - ordered)
    by_key = torch.sort(key, stable=True).indices
    window_starts = torch.nonzero(torch.diff(window_of[by_key])).flatten() + 1
    batches = _best_fit_decreasing(
        order[by_key].tolist(),
        sizes.tolist(),
        window_starts.tolist(),
        budget_tokens,
        int(sizes.min()),
        window_batches,
    )
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _best_fit_decreasing(
    items: list[int],
    size_of: list[int],
    window_starts: list[int],
    budget: int,
    smallest: int,
    keep_open: int,
) -> list[list[int]]:
    """Best fit over ``items`` (each window already longest first): every item goes into the
    open bin with the least room that holds it, else a new bin. At each window start only
    the ``keep_open`` emptiest bins stay open; a bin with less room than ``smallest`` closes."""
    bins: list[list[int]] = []
    free: list[int] = []  # sorted remaining capacities of the open bins
    owner: list[int] = []  # bin id of each entry of ``free``
    find = bisect.bisect_left
    starts = iter(window_starts)
    next_start = next(starts, len(items))
    for position, i in enumerate(items):
        if position == next_start:
            del free[: max(len(free) - keep_open, 0)]
            del owner[: max(len(owner) - keep_open, 0)]
            next_start = next(starts, len(items))
        size = size_of[i]
        pos = find(free, size)  # tightest bin with enough room
        if pos == len(free):
            b = len(bins)
            bins.append([i])
            remaining = budget - size
        else:
            b = owner.pop(pos)
            remaining = free.pop(pos) - size
            bins[b].append(i)
        if remaining >= smallest:
            at = find(free, remaining)
            free.insert(at, remaining)
            owner.insert(at, b)
    return bins


def packing_stats(
    batches: Sequence[Sequence[int]],
    budget_tokens: int,
    windows: TrajectoryWindows,
) -> PackingStats:
    """Statistics of a plan over trajectories whose packed windows are ``windows``."""
    flat = torch.tensor([i for b in batches for i in b], dtype=torch.int64)  # (N,)
    kept = windows.lengths[flat]
    return PackingStats(
        num_trajectories=flat.numel(),
        num_batches=len(batches),
        budget_tokens=budget_tokens,
        real_tokens=int(kept.sum()),
        num_truncated=int(windows.truncated[flat].sum()),
        truncated_tokens=int((windows.full_lengths[flat] - kept).sum()),
    )


def plan_rollouts(
    rollouts: RolloutSet,
    budget_tokens: int,
    *,
    seed: int,
    train_turns: TrainTurns = "last",
    shuffle: bool = True,
    indices: Sequence[int] | Tensor | None = None,
) -> tuple[list[MicroBatch], PackingStats]:
    """Micro-batches of rollout rows (all, or ``indices``) for one pass, and their stats.

    Over-long trajectories are planned at their truncated length. Each ``MicroBatch`` carries
    those truncation windows, and ``pack`` with ``max_tokens=budget_tokens`` (and the same
    ``train_turns``) packs it with them.
    """
    rows = (
        torch.arange(rollouts.num_trajectories)
        if indices is None
        else torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    )
    windows = trajectory_windows(rollouts, rows, train_turns=train_turns, max_tokens=budget_tokens)
    local = plan_micro_batches(windows.lengths, budget_tokens, seed, shuffle=shuffle)
    stats = packing_stats(local, budget_tokens, windows)
    # The windows by rollout row, shared by every micro-batch of the plan.
    by_row = TrajectoryWindows(
        *(
            torch.zeros(rollouts.num_trajectories, dtype=t.dtype).index_copy_(0, rows, t)
            for t in (windows.start, windows.end, windows.truncated, windows.full_lengths)
        ),
        budget_tokens,
        train_turns,
    )
    row_of = rows.tolist()
    return [MicroBatch([row_of[j] for j in batch], by_row) for batch in local], stats


def group_into_steps(
    micro_batches: Sequence[Sequence[int]], grad_accum: int, drop_last: bool = False
) -> list[list[list[int]]]:
    """Consecutive micro-batches grouped ``grad_accum`` per optimizer step. The last step may
    hold fewer (its normaliser counts only what it holds) unless ``drop_last``."""
    if grad_accum <= 0:
        raise ConfigError(f"grad_accum must be positive, got {grad_accum}")
    steps = [
        [list(b) for b in micro_batches[i : i + grad_accum]]
        for i in range(0, len(micro_batches), grad_accum)
    ]
    if drop_last and steps and len(steps[-1]) < grad_accum:
        steps.pop()
    return steps
