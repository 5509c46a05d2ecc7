"""The environment interface: how a multi-turn task checks answers and gives feedback.

An environment is stateless: everything about an episode is in its problem (a dict from a
JSONL line) and the turn index, so rollouts of many trajectories can share one instance.

    messages = env.initial_messages(problem)          # chat messages before the 1st answer
    for turn in range(1, max_turns + 1):
        answer = policy(messages)
        result = env.step(problem, answer, turn)
        if result.done: break
        messages += [assistant(answer), user(result.feedback)]
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from drift_engine.errors import DriftError, EnvironmentSpecError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Problem = dict[str, Any]

DEFAULT_FEEDBACK = "Incorrect. Please think again."


@dataclass(frozen=True)
class StepResult:
    """What the environment says about one assistant answer."""

    reward: float  # 1.0 if correct else 0.0 for the built-in environments
    done: bool  # the episode ends (a correct answer; the turn limit is the loop's business)
    feedback: str | None  # the user message that follows when not done
    answer: str | None  # the normalised parsed answer; None when it could not be parsed
    correct: bool
    error: str | None = None  # why the answer could not be scored (see `score_answer`)

    @property
    def parsed(self) -> bool:
        return self.answer is not None


class Environment(ABC):
    """A multi-turn task: problems in, first messages out; answers in, reward and feedback out."""

    name: str = "environment"
    # Fields every problem must have (after the loader's field renaming); checked by the
    # default `validate_problem`.
    required_fields: tuple[str, ...] = ()

    @abstractmethod
    def initial_messages(self, problem: Problem) -> list[Message]:
        """The chat messages the policy sees before its first answer."""

    @abstractmethod
    def step(self, problem: Problem, answer: str, turn: int) -> StepResult:
        """Check the assistant's `answer` at `turn` (1-based) and say what happens next."""

    def validate_problem(self, problem: Problem) -> None:
        """Raise EnvironmentSpecError if `problem` lacks what this environment needs."""
        missing = [f for f in self.required_fields if problem.get(f) in (None, "")]
        if missing:
            present = ", ".join(sorted(problem)) or "none"
            raise EnvironmentSpecError(
                f"the {self.name!r} environment needs the field(s) {', '.join(missing)} in every "
                f"problem, but a problem has only: {present}. Rename the fields in the file or "
                f"map them with --field NAME=FILE_FIELD (e.g. --field {missing[0]}=<your field>)."
            )

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings of this instance, recorded in the rollout file's metadata."""
        return {}


class PromptTemplateEnv(Environment):
    """An environment whose first messages are an optional system prompt and the problem
    filled into ``prompt_template`` (a str.format string with the fields
    ``template_fields``), and whose feedback after a wrong answer is ``feedback``."""

    template_fields: tuple[str, ...] = ("question",)

    def __init__(self, *, prompt_template: str, system_prompt: str | None, feedback: str) -> None:
        check_option_types(
            self.name,
            prompt_template=(prompt_template, str),
            system_prompt=(system_prompt, (str, type(None))),
            feedback=(feedback, str),
        )
        check_template(prompt_template, self.name, self.template_fields)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.feedback = feedback

    def prompt_messages(self, content: str) -> list[Message]:
        """The system prompt (if any), then ``content`` (the filled template) as the user."""
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def config(self) -> dict[str, Any]:
        return {
            "prompt_template": self.prompt_template,
            "system_prompt": self.system_prompt,
            "feedback": self.feedback,
        }


def check_option_types(env_name: str, **options: tuple[Any, type | tuple[type, ...]]) -> None:
    """Raise EnvironmentSpecError naming the first option whose value is not of its type
    (``name=(value, types)``), e.g. a number given where a prompt text is expected."""
    for name, (value, types) in options.items():
        if not isinstance(value, types):
            kinds = types if isinstance(types, tuple) else (types,)
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in kinds)
            raise EnvironmentSpecError(
                f"the {env_name} environment's option {name} must be {expected}, got {value!r}"
            )


def check_template(template: str, env_name: str, fields: tuple[str, ...] = ("question",)) -> None:
    """A prompt template is a str.format string with the given fields (literal braces doubled)."""
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as err:
        raise EnvironmentSpecError(
            f"the {env_name} environment's prompt_template {template!r} is not a valid format "
            f"string with the fields {{{'}, {'.join(fields)}}} ({err!r}); write literal braces "
            "doubled, e.g. \\boxed{{}}."
        ) from None
    if "{question}" not in template:
        raise EnvironmentSpecError(
            f"the {env_name} environment's prompt_template must contain '{{question}}' "
            f"(got {template!r})."
        )


def integer_value(value: Any, what: str) -> int:
    """``value`` as an int: an int, an integral finite float (11.0) or a string of one
    ("11"); anything else (11.5, Infinity, NaN, "abc", true) raises EnvironmentSpecError."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,100}\s*", value):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EnvironmentSpecError(f"{what} must be an integer, got {value!r}")


def score_answer(env: Environment, problem: Problem, answer: str, turn: int) -> StepResult:
    """``env.step(problem, answer, turn)``, with a failure to score this one answer contained.

    The rollout loop (and so ``eval``) scores every answer through here. An exception from
    the environment (an answer that breaks its parser, e.g. an integer of more than 4300
    digits, or a check that runs out of time) gives an incorrect, unparseable result with
    reward 0 and ``error`` naming the exception, so one answer never ends a rollout; the
    loop counts and reports such answers. A ``DriftError`` (the environment's configuration
    or the problem is wrong) is not contained.
    """
    try:
        return env.step(problem, answer, turn)
    except DriftError:
        raise
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
        if len(message) > 200:
            message = message[:200] + "..."
        return StepResult(0.0, False, None, None, False, error=message)
