"""Guess-a-number: the toy environment of the embedded demo, where feedback matters.

The policy is asked for a secret integer in ``[low, high]``. After a wrong guess the
environment says ``"Higher."`` (the secret is larger) or ``"Lower."``; a correct guess ends
the episode with reward 1. A policy that uses the feedback (bisection) finds 31 of the 32
secrets of 1..32 within 5 guesses, one that ignores it (repeats itself, guesses at random)
rarely finds any, so multi@k measures exactly what DRIFT trains for. The secret is never shown to the policy:
a problem is ``{"secret": 11}``, optionally with its own ``"low"``/``"high"``.

Answers are ``<answer>11</answer>`` (whitespace inside the tags is ignored; the last tagged
answer counts) or a bare integer. Anything else is unparseable: reward 0, ``answer=None``
and a reminder of the format as feedback, so the rollout loop can record it as a format
penalty. A parsed guess outside the range still gets the truthful higher/lower hint.
"""

from __future__ import annotations

import re

from drift_engine.envs.base import (
    Environment,
    Message,
    Problem,
    StepResult,
    check_option_types,
    integer_value,
)
from drift_engine.envs.math import last_answer_tag
from drift_engine.errors import EnvironmentSpecError

_INTEGER = re.compile(r"[+-]?\d+")

HIGHER = "Higher."
LOWER = "Lower."
FORMAT_REMINDER = "Answer with <answer>number</answer>."


def parse_guess(text: str) -> int | None:
    """The integer guessed in `text`, or None when it is not a well-formed answer."""
    tagged = last_answer_tag(text, ignore_case=False)
    candidate = tagged[1] if tagged else text
    candidate = candidate.strip()
    if not _INTEGER.fullmatch(candidate):
        return None
    return int(candidate)


class GuessNumberEnv(Environment):
    """Guess a secret integer in ``[low, high]`` with "Higher."/"Lower." feedback.

    ``low`` and ``high`` are the default range; a problem may override them with its own
    ``"low"``/``"high"`` fields. ``secret_field`` names the problem field of the secret.
    """

    name = "guess"
    required_fields = ("secret",)

    def __init__(self, low: int = 1, high: int = 32, secret_field: str = "secret") -> None:
        check_option_types("guess", secret_field=(secret_field, str))
        low = integer_value(low, "guess environment: low")
        high = integer_value(high, "guess environment: high")
        if low > high:
            raise EnvironmentSpecError(
                f"guess environment: low={low} is above high={high}; give low <= high"
            )
        self.low = low
        self.high = high
        self.secret_field = secret_field
        self.required_fields = (secret_field,)

    def config(self) -> dict:
        return {"low": self.low, "high": self.high, "secret_field": self.secret_field}

    def bounds(self, problem: Problem) -> tuple[int, int]:
        """The (low, high) range of `problem`: its own fields, else the environment's."""
        return (
            integer_value(problem.get("low", self.low), "a guess problem's low"),
            integer_value(problem.get("high", self.high), "a guess problem's high"),
        )

    def prompt(self, problem: Problem) -> str:
        low, high = self.bounds(problem)
        return f"Guess my number between {low} and {high}. {FORMAT_REMINDER}"

    def initial_messages(self, problem: Problem) -> list[Message]:
        return [{"role": "user", "content": self.prompt(problem)}]

    def step(self, problem: Problem, answer: str, turn: int) -> StepResult:
        secret = integer_value(problem[self.secret_field], "a guess problem's secret")
        guess = parse_guess(answer)
        if guess is None:
            return StepResult(
                reward=0.0, done=False, feedback=FORMAT_REMINDER, answer=None, correct=False
            )
        if guess == secret:
            return StepResult(reward=1.0, done=True, feedback=None, answer=str(guess), correct=True)
        feedback = HIGHER if secret > guess else LOWER
        return StepResult(
            reward=0.0, done=False, feedback=feedback, answer=str(guess), correct=False
        )

    def validate_problem(self, problem: Problem) -> None:
        if self.secret_field not in problem:
            raise EnvironmentSpecError(
                f"guess problem {problem!r} has no {self.secret_field!r} field; "
                f'give each JSONL line e.g. {{"{self.secret_field}": 11}}'
            )
        try:
            secret = integer_value(problem[self.secret_field], self.secret_field)
            low, high = self.bounds(problem)
        except EnvironmentSpecError as err:
            raise EnvironmentSpecError(
                f"guess problem {problem!r}: secret, low and high must be integers ({err})"
            ) from None
        if not low <= secret <= high:
            raise EnvironmentSpecError(
                f"guess problem {problem!r}: secret {secret} is outside [{low}, {high}]"
            )


def guess_problems(secrets: list[int], low: int = 1, high: int = 32) -> list[Problem]:
    """Problems for the given secrets with an explicit range (one dict per JSONL line)."""
    return [{"secret": int(s), "low": low, "high": high} for s in secrets]


# --------------------------------------------------------------------------------------
# Scripted players: the habits the embedded demo's reference model is pretrained on.
# --------------------------------------------------------------------------------------

PLAYER_STYLES = ("bisect", "step", "repeat", "random")
"""bisect: the middle of the range still consistent with the feedback (optimal);
step: one past the previous guess in the direction of the feedback (consistent, slow);
repeat: the previous guess again (ignores the feedback);
random: a uniform guess over the whole range every turn (ignores the feedback)."""


def consistent_range(low: int, high: int, history: list[tuple[int | None, str]]) -> tuple[int, int]:
    """The sub-range of [low, high] that agrees with every (guess, feedback) in `history`."""
    for guess, feedback in history:
        if guess is None:
            continue
        if feedback == HIGHER:
            low = max(low, guess + 1)
        elif feedback == LOWER:
            high = min(high, guess - 1)
    return low, high


def scripted_guess(
    style: str, low: int, high: int, history: list[tuple[int | None, str]], rng
) -> int:
    """The next guess of a player of `style` after `history` ((guess, feedback) per turn;
    guess None for an unparseable turn). `rng` is a `random.Random`, used by "random"."""
    if style not in PLAYER_STYLES:
        raise ValueError(f"unknown player style {style!r}; choose one of {PLAYER_STYLES}")
    if style == "random":
        return rng.randint(low, high)
    parsed = [(g, f) for g, f in history if g is not None]
    if style == "bisect" or not parsed:
        # Every non-random player opens in the middle; bisect keeps halving what is left.
        lo, hi = consistent_range(low, high, history)
        if lo > hi:  # contradictory feedback cannot come from this environment
            lo, hi = low, high
        return (lo + hi) // 2
    last_guess, last_feedback = parsed[-1]
    if style == "repeat":
        return last_guess
    step = 1 if last_feedback == HIGHER else -1
    return min(high, max(low, last_guess + step))
