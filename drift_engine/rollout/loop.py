"""The multi-turn rollout loop: n trajectories per prompt, up to K turns, against an environment.

Every turn, all unfinished trajectories go to the engine as one batch of token ids; each
answer is checked by the environment; a trajectory leaves the batch at its first correct
answer (or when the environment ends it) or after ``max_turns``. Tokens are never
re-tokenised from text (see ``drift_engine.rollout.chat``).

Randomness is per request: the seed of prompt i, sample j, turn t is derived from
(seed, i, j, t), with i the prompt's index in the whole problem list. So a run sharded over
prompts (``shard_rank``/``shard_world``) produces exactly the trajectories of the
single-process run, with the same global group ids, and its shards concatenate into it.
The summaries stored in the metadata (per-turn counts, template mismatches, context-limit
endings) add up over shards, so a merged set reports what the single-process run would
(``drift_engine.rollout.shards``).

The context limit. With an engine that has one (``engine.max_model_len``, the same for both
engines), a request never asks for more tokens than its conversation has room for: its
token limit is cut to the room left (less the tokens the template's closing of a cut answer
takes, so that the stored trajectory fits), and a turn that fills it ends the trajectory
(finish reason ``"context"``); so does a turn whose feedback and next generation prompt
would leave no room. Such a trajectory ends cleanly after its last answer, is counted
(``context_limit`` in the metadata, printed in the summary) and is kept. A first prompt
that leaves no room is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from drift_engine.data.rollouts import (
    META_ENV,
    META_ENV_CONFIG,
    META_SAMPLING,
    RolloutSet,
    tokenizer_fingerprint,
)
from drift_engine.envs import Environment, environment_spec, score_answer
from drift_engine.envs.base import DEFAULT_FEEDBACK, Message, Problem
from drift_engine.errors import ConfigError, EnvironmentSpecError
from drift_engine.launch import torchrun_env
from drift_engine.rollout.chat import ChatFormatter, first_mismatch
from drift_engine.rollout.engine import Engine, SamplingParams, request_seed
from drift_engine.weighting import format_penalty_term, repeat_penalty_term

# JSON: {"trajectories": mismatched, "checked": int, "first": [prompt, sample, position] | null}
META_TEMPLATE_MISMATCHES = "template_mismatches"
# JSON: {"total": S, "answered": [per turn], "correct": [per turn], "solved": [per turn]}
META_TURN_STATS = "turn_stats"
META_PROBLEMS = "problems"  # JSON: {"count": int, "sha256": hash of the whole problem list}
META_SHARD = "shard"  # "rank/world"; "0/1" for a whole set
# JSON: {"trajectories": ended at the context limit, "max_model_len": int | null}
META_CONTEXT_LIMIT = "context_limit"


@dataclass
class Trajectory:
    """One episode: the conversation, its tokens exactly as stored, and its outcome."""

    prompt_index: int  # index in the full problem list; the trajectory's group id
    sample_index: int
    messages: list[Message]
    token_ids: list[int]
    turn_ids: list[int]  # 0 = context, k = k-th assistant message
    logprobs: list[float] | None  # per token; 0.0 on context tokens
    rewards: list[float] = field(default_factory=list)  # one per assistant turn
    correct: list[bool] = field(default_factory=list)  # one per assistant turn
    answers: list[str | None] = field(default_factory=list)  # normalised; None = unparseable
    finish_reasons: list[str] = field(default_factory=list)  # stop/length/context, per turn
    template_mismatch: int | None = None  # first position differing from the template's ids
    # (turn, error) of answers the environment could not score (reward 0; envs.score_answer)
    scoring_errors: list[tuple[int, str]] = field(default_factory=list)
    context_limited: bool = False  # ended by the engine's context limit before its episode did

    @property
    def num_turns(self) -> int:
        return len(self.rewards)

    @property
    def first_correct_turn(self) -> int | None:
        return next((k + 1 for k, c in enumerate(self.correct) if c), None)


@dataclass
class TemplateReport:
    """Trajectories whose stored ids differ from the template applied to their conversation.

    ``first_*`` describe the mismatched trajectory with the smallest (prompt, sample) index,
    so reports of shards combine into the report of the whole run.
    """

    checked: int = 0
    mismatched: int = 0
    first_trajectory: tuple[int, int] | None = None  # (prompt_index, sample_index)
    first_position: int | None = None

    def to_json(self) -> str:
        first = None
        if self.first_trajectory is not None:
            first = [*self.first_trajectory, self.first_position]
        return json.dumps(
            {"trajectories": self.mismatched, "checked": self.checked, "first": first}
        )

    @classmethod
    def from_json(cls, text: str) -> TemplateReport:
        data = json.loads(text)
        first = data.get("first")
        return cls(
            checked=int(data["checked"]),
            mismatched=int(data["trajectories"]),
            first_trajectory=None if first is None else (int(first[0]), int(first[1])),
            first_position=None if first is None else int(first[2]),
        )

    @classmethod
    def combine(cls, reports: Sequence[TemplateReport]) -> TemplateReport:
        firsts = [r for r in reports if r.first_trajectory is not None]
        first = min(firsts, key=lambda r: r.first_trajectory, default=None)
        return cls(
            checked=sum(r.checked for r in reports),
            mismatched=sum(r.mismatched for r in reports),
            first_trajectory=None if first is None else first.first_trajectory,
            first_position=None if first is None else first.first_position,
        )

    def summary(self) -> str:
        if not self.mismatched:
            return f"token bookkeeping: all {self.checked} trajectories equal the chat template"
        return (
            f"token bookkeeping: {self.mismatched} of {self.checked} trajectories differ from "
            "apply_chat_template of their final conversation (first: prompt "
            f"{self.first_trajectory[0]}, sample {self.first_trajectory[1]}, at token "
            f"{self.first_position}); the sampled ids are stored as generated. Causes: a "
            "sampled tokenisation that is not the canonical one, or a chat template that "
            "rewrites earlier messages."
        )


@dataclass
class RolloutRun:
    """What ``collect_trajectories`` returns: trajectories in (prompt, sample) order."""

    trajectories: list[Trajectory]
    max_turns: int
    report: TemplateReport
    metadata: dict[str, str]


@dataclass(frozen=True)
class TurnStats:
    turn: int
    answered: int  # trajectories that gave a k-th answer
    correct: int  # of those, correct
    solved: int  # trajectories whose first correct answer came at turn <= k
    total: int
    scoring_errors: int = 0  # of the answers, those the environment could not score

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else 0.0

    @property
    def solved_fraction(self) -> float:
        return self.solved / self.total if self.total else 0.0


def shard_from_env() -> tuple[int, int]:
    """(rank, world) from torchrun's RANK/WORLD_SIZE, (0, 1) outside torchrun."""
    env = torchrun_env()
    return env.rank, env.world_size


def shard_range(num_prompts: int, rank: int, world: int) -> range:
    """The contiguous block of prompt indices of shard ``rank`` of ``world`` (sizes differ
    by at most one), so shards concatenated in rank order give the prompts in order."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard rank must lie in [0, {world}) with world >= 1, got rank {rank}.")
    base, extra = divmod(num_prompts, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def collect_trajectories(
    engine: Engine,
    tokenizer: Any,
    env: Environment,
    problems: Sequence[Problem],
    *,
    n: int,
    max_turns: int,
    sampling: SamplingParams,
    seed: int,
    shard_rank: int = 0,
    shard_world: int = 1,
    progress: bool | Any = True,
    chat_template: str | None = None,
    prompt_range: range | None = None,
) -> RolloutRun:
    """Run the multi-turn episodes of this shard's prompts; see the module docstring.

    ``prompt_range`` (prompt indices inside this shard's block) rolls out only those, e.g.
    one part of a run written progressively (``drift_engine.rollout.parts``). ``progress``
    may be a tqdm-like bar to advance (left open) instead of True/False.
    """
    if n < 1:
        raise ConfigError(f"n (trajectories per prompt) must be at least 1, got {n}.")
    if max_turns < 1:
        raise ConfigError(f"max_turns must be at least 1, got {max_turns}.")
    if not problems:
        raise EnvironmentSpecError("no problems to roll out: the problem list is empty.")
    formatter = ChatFormatter(tokenizer, chat_template)
    validate_problems(env, problems, prompt_range)
    stops = tuple(dict.fromkeys([*sampling.stop_token_ids, *formatter.stop_token_ids()]))
    if not stops:
        raise ConfigError(
            "no stop token: the tokenizer has no EOS token and its chat template no "
            "end-of-turn token; pass stop_token_ids in the sampling parameters."
        )
    params = replace(sampling, stop_token_ids=stops)
    stop_set = set(stops)
    block = shard_range(len(problems), shard_rank, shard_world)
    if prompt_range is not None:
        if len(prompt_range) and (prompt_range[0] < block.start or prompt_range[-1] >= block.stop):
            raise ConfigError(
                f"prompt_range {prompt_range} lies outside shard {shard_rank}/{shard_world}'s "
                f"prompts {block}."
            )
        block = prompt_range
    limit = engine.max_model_len
    reserve = 0  # tokens the closing of an answer cut by the token limit adds
    if limit is not None and len(block):  # a shard may hold no prompts
        first = problems[block[0]]
        closing, _ = formatter.assistant_closing(env.initial_messages(first), "", None)
        reserve = len(formatter.encode(closing)) if closing else 0
    trajectories: list[Trajectory] = []
    for prompt_index in block:
        messages = env.initial_messages(problems[prompt_index])
        ids = formatter.prompt_ids(messages)
        for sample_index in range(n):
            trajectories.append(
                Trajectory(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    messages=[dict(m) for m in messages],
                    token_ids=list(ids),
                    turn_ids=[0] * len(ids),
                    logprobs=[0.0] * len(ids) if params.logprobs else None,
                )
            )

    report = TemplateReport()
    bar = progress if not isinstance(progress, bool) else progress_bar(len(trajectories), progress)
    active = list(trajectories)
    for turn in range(1, max_turns + 1):
        if not active:
            break
        seeds = [request_seed(seed, t.prompt_index, t.sample_index, turn) for t in active]
        budgets = _token_budgets(active, params.max_new_tokens, limit, reserve)
        # Engines that know no context limit keep the three-argument call.
        cut = any(b != params.max_new_tokens for b in budgets)
        extra = {"max_new_tokens": budgets} if cut else {}
        generations = engine.generate([t.token_ids for t in active], params, seeds, **extra)
        still_active = []
        for traj, generation, budget in zip(active, generations, budgets, strict=True):
            ids = list(generation.token_ids)
            stopped = bool(ids) and ids[-1] in stop_set
            full = not stopped and budget < params.max_new_tokens and len(ids) >= budget
            content = formatter.decode(ids[:-1] if stopped else ids)
            result = score_answer(env, problems[traj.prompt_index], content, turn)
            if result.error is not None:
                traj.scoring_errors.append((turn, result.error))

            traj.token_ids += ids
            traj.turn_ids += [turn] * len(ids)
            if traj.logprobs is not None:
                if generation.logprobs is None or len(generation.logprobs) != len(ids):
                    raise RuntimeError(f"engine {engine.name!r} returned no log-probs per token")
                traj.logprobs += [float(x) for x in generation.logprobs]
            traj.rewards.append(float(result.reward))
            traj.correct.append(bool(result.correct))
            traj.answers.append(result.answer)
            traj.finish_reasons.append("context" if full else generation.finish_reason)

            stop_text = formatter.decode(ids[-1:]) if stopped else None
            delta, _ = formatter.assistant_closing(traj.messages, content, stop_text)
            traj.messages.append({"role": "assistant", "content": content})
            finished = result.done or turn == max_turns
            traj.context_limited = full and not finished
            finished = finished or full
            delta_ids = None
            if not finished:
                feedback = {"role": "user", "content": result.feedback or DEFAULT_FEEDBACK}
                feedback_text, _ = formatter.feedback_delta(traj.messages, feedback)
                delta_ids = formatter.encode(delta + feedback_text)
                if limit is not None and len(traj.token_ids) + len(delta_ids) + reserve >= limit:
                    # No room left for a next answer: end after this one.
                    delta_ids, finished, traj.context_limited = None, True, True
                else:
                    traj.messages.append(feedback)
            if delta_ids is None:
                delta_ids = formatter.encode(delta) if delta else []
            traj.token_ids += delta_ids
            traj.turn_ids += [0] * len(delta_ids)
            if traj.logprobs is not None:
                traj.logprobs += [0.0] * len(delta_ids)

            if finished:
                _check_against_template(traj, formatter, report)
                bar.update(1)
            else:
                still_active.append(traj)
        active = still_active
    if bar is not progress:
        bar.close()
    if report.mismatched:
        warnings.warn(report.summary(), stacklevel=2)
    errors = [(t, k, e) for t in trajectories for k, e in t.scoring_errors]
    if errors:
        t, k, e = errors[0]
        warnings.warn(
            f"{len(errors)} answers could not be scored by the {env.name!r} environment and got "
            f"reward 0 (first: prompt {t.prompt_index}, sample {t.sample_index}, turn {k}: {e})",
            stacklevel=2,
        )

    sampling_meta = {
        **{k: v for k, v in asdict(params).items() if k != "stop_token_ids"},
        "stop_token_ids": list(params.stop_token_ids),
        "n": n,
        "max_turns": max_turns,
        "seed": seed,
        **engine.describe(),
    }
    metadata = {
        **tokenizer_fingerprint(tokenizer),
        META_ENV: environment_spec(env),
        META_ENV_CONFIG: json.dumps(env.config(), sort_keys=True),
        META_SAMPLING: json.dumps(sampling_meta, sort_keys=True),
        META_PROBLEMS: problems_fingerprint(problems),
        META_TEMPLATE_MISMATCHES: report.to_json(),
        META_TURN_STATS: turn_stats_to_json(turn_stats(trajectories, max_turns)),
        META_CONTEXT_LIMIT: json.dumps(
            {
                "trajectories": sum(t.context_limited for t in trajectories),
                "max_model_len": limit,
            }
        ),
        META_SHARD: f"{shard_rank}/{shard_world}",
    }
    return RolloutRun(trajectories, max_turns, report, metadata)


def validate_problems(
    env: Environment, problems: Sequence[Problem], indices: Sequence[int] | None = None
) -> None:
    """Check problems ``indices`` (default all) with the environment; the error names the
    first bad problem's index."""
    for index in range(len(problems)) if indices is None else indices:
        try:
            env.validate_problem(problems[index])
        except EnvironmentSpecError as err:
            raise EnvironmentSpecError(f"problem {index}: {err}") from None


def _token_budgets(
    active: Sequence[Trajectory], max_new_tokens: int, limit: int | None, reserve: int
) -> list[int]:
    """Each request's token limit: ``max_new_tokens``, cut to the room its conversation has
    left under the context limit, ``reserve`` tokens kept for the closing of a cut answer
    (the loop ends trajectories before the room runs out)."""
    if limit is None:
        return [max_new_tokens] * len(active)
    budgets = []
    for traj in active:
        room = limit - len(traj.token_ids) - reserve
        if room < 1:  # only a first prompt can get here
            raise ConfigError(
                f"problem {traj.prompt_index}: its prompt has {len(traj.token_ids)} tokens, "
                f"which leaves no room for an answer within the engine's max model length "
                f"{limit}; shorten the prompt or raise --max-model-len."
            )
        budgets.append(min(max_new_tokens, room))
    return budgets


def context_limit_summary(text: str) -> str | None:
    """The summary line of a ``context_limit`` metadata entry; None when none was hit."""
    data = json.loads(text)
    if not data["trajectories"]:
        return None
    return (
        f"context limit: {data['trajectories']} trajectories ended at the engine's max model "
        f"length ({data['max_model_len']} tokens) before their episode was over (finish reason "
        "'context'; raise --max-model-len or lower --max-new-tokens/--max-turns)"
    )


def progress_bar(total: int, enabled: bool):
    """The rollout's progress bar (one tick per finished trajectory)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="traj", desc="rollout", disable=not enabled, smoothing=0.1)


def _check_against_template(
    traj: Trajectory, formatter: ChatFormatter, report: TemplateReport
) -> None:
    expected = formatter.conversation_ids(traj.messages)
    position = first_mismatch(traj.token_ids, expected)
    report.checked += 1
    traj.template_mismatch = position
    if position is not None:
        report.mismatched += 1
        key = (traj.prompt_index, traj.sample_index)
        if report.first_trajectory is None or key < report.first_trajectory:
            report.first_trajectory = key
            report.first_position = position


def to_rollout_set(run: RolloutRun, metadata: dict[str, str] | None = None) -> RolloutSet:
    """Pack trajectories into a ``RolloutSet`` with format and repeat penalties."""
    trajectories = run.trajectories
    logprobs = [t.logprobs for t in trajectories]
    return RolloutSet.from_trajectories(
        token_ids=[t.token_ids for t in trajectories],
        turn_ids=[t.turn_ids for t in trajectories],
        group_ids=[t.prompt_index for t in trajectories],
        turn_rewards=[t.rewards for t in trajectories],
        format_penalty=[
            format_penalty_term(sum(a is None for a in t.answers)) for t in trajectories
        ],
        repeat_penalty=[repeat_penalty_term(t.answers) for t in trajectories],
        behavior_logprobs=None if any(lp is None for lp in logprobs) else logprobs,
        metadata={**run.metadata, **(metadata or {})},
    )


def run_rollouts(
    engine: Engine,
    tokenizer: Any,
    env: Environment,
    problems: Sequence[Problem],
    *,
    metadata: dict[str, str] | None = None,
    **settings: Any,
) -> RolloutSet:
    """Roll out ``n`` trajectories per problem of this shard and pack them into a RolloutSet
    (group id = the problem's index in ``problems``). ``settings`` are the keyword arguments
    of :func:`collect_trajectories` (``n``, ``max_turns``, ``sampling``, ``seed``, the shard,
    ``progress``, ``chat_template``)."""
    run = collect_trajectories(engine, tokenizer, env, problems, **settings)
    return to_rollout_set(run, metadata)


def turn_stats(trajectories: Sequence[Trajectory], max_turns: int) -> list[TurnStats]:
    """Per-turn answers, accuracy and cumulative solved count, k = 1..max_turns."""
    stats = []
    for k in range(1, max_turns + 1):
        answered = [t for t in trajectories if t.num_turns >= k]
        stats.append(
            TurnStats(
                turn=k,
                answered=len(answered),
                correct=sum(t.correct[k - 1] for t in answered),
                solved=sum(
                    t.first_correct_turn is not None and t.first_correct_turn <= k
                    for t in trajectories
                ),
                total=len(trajectories),
                scoring_errors=sum(any(j == k for j, _ in t.scoring_errors) for t in answered),
            )
        )
    return stats


def turn_stats_to_json(stats: Sequence[TurnStats]) -> str:
    """The counts behind ``stats`` (they add up over shards), for the rollout metadata."""
    return json.dumps(
        {
            "total": stats[0].total if stats else 0,
            "answered": [s.answered for s in stats],
            "correct": [s.correct for s in stats],
            "solved": [s.solved for s in stats],
            "scoring_errors": [s.scoring_errors for s in stats],
        }
    )


def turn_stats_from_json(text: str) -> list[TurnStats]:
    data = json.loads(text)
    errors = data.get("scoring_errors", [0] * len(data["answered"]))
    return [
        TurnStats(
            turn=k + 1, answered=a, correct=c, solved=s, total=data["total"], scoring_errors=x
        )
        for k, (a, c, s, x) in enumerate(
            zip(data["answered"], data["correct"], data["solved"], errors, strict=True)
        )
    ]


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """Count and hash of the whole problem list: shards of one run must agree on it."""
    text = json.dumps(list(problems), sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return json.dumps({"count": len(problems), "sha256": digest})


def format_turn_stats(stats: Sequence[TurnStats]) -> str:
    lines = ["turn  answered  correct  accuracy  solved<=turn"]
    for s in stats:
        lines.append(
            f"{s.turn:>4}  {s.answered:>8}  {s.correct:>7}  {s.accuracy:>8.3f}  "
            f"{s.solved_fraction:>12.3f}"
        )
    errors = sum(s.scoring_errors for s in stats)
    if errors:
        lines.append(f"{errors} answers could not be scored by the environment (reward 0)")
    return "\n".join(lines)


def write_preview(run: RolloutRun, path: str | os.PathLike) -> Path:
    """A human-readable JSONL: one line per trajectory with its conversation and outcome."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in run.trajectories:
            record = {
                "prompt_index": t.prompt_index,
                "sample_index": t.sample_index,
                "messages": t.messages,
                "rewards": t.rewards,
                "answers": t.answers,
                "first_correct_turn": t.first_correct_turn,
                "finish_reasons": t.finish_reasons,
                "context_limited": t.context_limited,
                "num_tokens": len(t.token_ids),
                "template_mismatch_at": t.template_mismatch,
                "scoring_errors": t.scoring_errors,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
