"""The ``choice`` environment: multiple choice with options A–J (MMLU, GPQA style).

Problem fields: ``question`` (str); ``choices`` (optional: a list of option texts, or a
dict letter → text; without it the question must already list the options); ``answer``
(the correct letter, a 0-based option index, or the text of the correct option).

The response's letter is read, in order of preference, from the last ``<answer>X</answer>``,
the last ``\\boxed{X}``, the last "Answer: X" / "the answer is (X)", the last "(X)", or a
response that is just the letter ("C", "C.", "(C)").
"""

from __future__ import annotations

import re

from drift_engine.envs.base import (
    DEFAULT_FEEDBACK,
    Message,
    Problem,
    PromptTemplateEnv,
    StepResult,
)
from drift_engine.envs.math import _last_boxed, last_answer_tag
from drift_engine.errors import EnvironmentSpecError

LETTERS = "ABCDEFGHIJ"

DEFAULT_CHOICE_PROMPT = (
    "{question}\n\n{choices}\n\n"
    'Think step by step, then finish with "Answer: X" where X is the letter of the correct option.'
)

_ANSWER_IS = re.compile(
    r"answer\s*(?:is|:)?\s*(?:option\s*)?[:\s]*[(\[*]*\s*([A-J])\s*[)\]*]*(?![A-Za-z])",
    re.IGNORECASE,
)
_PAREN = re.compile(r"\(([A-J])\)")
_BARE = re.compile(r"^\s*[(\[*]*\s*([A-J])\s*[)\]*]*\s*[.:]?\s*$")


def extract_choice(text: str, letters: str = LETTERS) -> str | None:
    """The option letter a response commits to, restricted to ``letters``; None if absent."""

    def last(pattern: re.Pattern[str], s: str, upper: bool) -> str | None:
        found = [m.group(1) for m in pattern.finditer(s)]
        found = [f.upper() if upper else f for f in found]
        found = [f for f in found if f in letters]
        return found[-1] if found else None

    tag = last_answer_tag(text)
    if tag is not None:
        inner = tag[1].strip()
        bare = _BARE.match(inner) or _ANSWER_IS.search(inner)
        if bare and bare.group(1).upper() in letters:
            return bare.group(1).upper()
        return None  # the model committed to an answer tag without a valid letter
    boxed = _last_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed[1]).strip()
        bare = _BARE.match(inner)
        return bare.group(1).upper() if bare and bare.group(1).upper() in letters else None
    for pattern, upper in ((_ANSWER_IS, False), (_PAREN, False)):
        # Upper-case letters only: "answer is a" is prose, not option A.
        letter = last(pattern, text, upper)
        if letter is not None:
            return letter
    bare = _BARE.match(text)
    return bare.group(1) if bare and bare.group(1) in letters else None


def _options(problem: Problem) -> list[tuple[str, str]] | None:
    """(letter, text) pairs of a problem's choices, or None when it has none."""
    choices = problem.get("choices")
    if choices is None:
        return None
    if isinstance(choices, dict):
        pairs = [(str(k).strip().upper(), str(v)) for k, v in choices.items()]
    elif isinstance(choices, (list, tuple)):
        pairs = [(LETTERS[i], str(v)) for i, v in enumerate(choices[: len(LETTERS)])]
        if len(choices) > len(LETTERS):
            raise EnvironmentSpecError(
                f"a choice problem has {len(choices)} options; at most {len(LETTERS)} (A–J) "
                "are supported."
            )
    else:
        raise EnvironmentSpecError(
            f"a choice problem's 'choices' must be a list of option texts or a dict "
            f"letter → text, not {type(choices).__name__}."
        )
    bad = [k for k, _ in pairs if len(k) != 1 or k not in LETTERS]
    if bad:
        raise EnvironmentSpecError(
            f"a choice problem's option keys must be letters A–J, got {bad}."
        )
    return pairs


class ChoiceEnv(PromptTemplateEnv):
    """Multiple-choice questions with options A–J."""

    name = "choice"
    required_fields = ("question", "answer")
    template_fields = ("question", "choices")

    def __init__(
        self,
        *,
        prompt_template: str = DEFAULT_CHOICE_PROMPT,
        system_prompt: str | None = None,
        feedback: str = DEFAULT_FEEDBACK,
    ) -> None:
        super().__init__(
            prompt_template=prompt_template, system_prompt=system_prompt, feedback=feedback
        )

    def validate_problem(self, problem: Problem) -> None:
        super().validate_problem(problem)
        self.correct_letter(problem)

    def letters(self, problem: Problem) -> str:
        options = _options(problem)
        return LETTERS if options is None else "".join(k for k, _ in options)

    def correct_letter(self, problem: Problem) -> str:
        answer = problem["answer"]
        options = _options(problem)
        letters = self.letters(problem)
        if isinstance(answer, int) and not isinstance(answer, bool):
            if 0 <= answer < len(letters):
                return letters[answer]
        else:
            text = str(answer).strip()
            stripped = text.strip("()[]. ").upper()
            if len(stripped) == 1 and stripped in letters:
                return stripped
            if text.isdigit() and len(text) <= 2 and int(text) < len(letters):
                return letters[int(text)]
            for letter, option in options or []:
                if option.strip() == text:
                    return letter
        raise EnvironmentSpecError(
            f"a choice problem's answer {answer!r} is not one of its option letters "
            f"{', '.join(letters)}, a 0-based option index, or the text of an option."
        )

    def initial_messages(self, problem: Problem) -> list[Message]:
        options = _options(problem)
        listed = "" if options is None else "\n".join(f"{k}. {v}" for k, v in options)
        content = self.prompt_template.format(question=problem["question"], choices=listed)
        return self.prompt_messages(re.sub(r"\n{3,}", "\n\n", content))

    def step(self, problem: Problem, answer: str, turn: int) -> StepResult:
        letter = extract_choice(answer, self.letters(problem))
        if letter is None:
            return StepResult(0.0, False, self.feedback, None, False)
        correct = letter == self.correct_letter(problem)
        return StepResult(
            reward=1.0 if correct else 0.0,
            done=correct,
            feedback=None if correct else self.feedback,
            answer=letter,
            correct=correct,
        )
