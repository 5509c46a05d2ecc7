"""The guess-a-number environment's rules and its scripted players."""

import random

import pytest

from drift_engine.envs import load_environment
from drift_engine.envs.guess import (
    FORMAT_REMINDER,
    HIGHER,
    LOWER,
    GuessNumberEnv,
    consistent_range,
    guess_problems,
    parse_guess,
    scripted_guess,
)
from drift_engine.errors import EnvironmentSpecError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>11</answer>", 11),
        ("<answer> 11 </answer>", 11),
        ("<answer>\n7\n</answer>", 7),
        ("I think <answer>3</answer> no, <answer>5</answer>", 5),  # the last tag counts
        ("12", 12),
        ("  12 \n", 12),
        ("-4", -4),
        ("<answer>number</answer>", None),
        ("<answer>12", None),  # unclosed tag
        ("<answer></answer>", None),
        ("<answer>1.5</answer>", None),
        ("twelve", None),
        ("12 13", None),
        ("", None),
    ],
)
def test_parse_guess(text, expected):
    assert parse_guess(text) == expected


def test_wrong_guesses_get_higher_or_lower():
    env = GuessNumberEnv(low=1, high=32)
    problem = {"secret": 20}
    low = env.step(problem, "<answer>7</answer>", turn=1)
    assert (low.reward, low.done, low.correct, low.feedback, low.answer) == (
        0.0,
        False,
        False,
        HIGHER,
        "7",
    )
    high = env.step(problem, "<answer>25</answer>", turn=2)
    assert (high.feedback, high.done, high.answer) == (LOWER, False, "25")
    # Out of range is still a parsed, wrong guess with a truthful hint.
    assert env.step(problem, "<answer>40</answer>", turn=3).feedback == LOWER
    assert env.step(problem, "<answer>0</answer>", turn=3).feedback == HIGHER


def test_correct_guess_ends_the_episode():
    env = GuessNumberEnv()
    result = env.step({"secret": 9}, "<answer> 09 </answer>", turn=4)
    assert result.correct and result.done and result.reward == 1.0
    assert result.feedback is None and result.answer == "9"


def test_malformed_answer_is_recorded_as_unparsed():
    env = GuessNumberEnv()
    result = env.step({"secret": 9}, "<answer>number</answer>", turn=1)
    assert not result.parsed and result.answer is None
    assert (result.reward, result.done, result.correct) == (0.0, False, False)
    assert result.feedback == FORMAT_REMINDER


def test_problem_range_overrides_the_environment_range():
    env = GuessNumberEnv(low=1, high=32)
    problem = {"secret": 50, "low": 40, "high": 60}
    assert env.bounds(problem) == (40, 60)
    assert "between 40 and 60" in env.initial_messages(problem)[0]["content"]
    env.validate_problem(problem)
    assert env.step(problem, "50", turn=1).correct


def test_initial_messages_and_config():
    env = GuessNumberEnv(low=1, high=16)
    messages = env.initial_messages({"secret": 3})
    assert [m["role"] for m in messages] == ["user"]
    assert "between 1 and 16" in messages[0]["content"]
    assert "3" not in messages[0]["content"].replace("1 and 16", "")  # the secret stays hidden
    assert env.config() == {"low": 1, "high": 16, "secret_field": "secret"}


@pytest.mark.parametrize(
    "problem, match",
    [
        ({"answer": 3}, "secret"),
        ({"secret": "seven"}, "integers"),
        ({"secret": 33}, "outside"),
        ({"secret": 5, "low": 6, "high": 9}, "outside"),
    ],
)
def test_bad_problems_are_rejected(problem, match):
    with pytest.raises(EnvironmentSpecError, match=match):
        GuessNumberEnv(low=1, high=32).validate_problem(problem)


def test_bad_range_is_rejected():
    with pytest.raises(EnvironmentSpecError, match="low"):
        GuessNumberEnv(low=10, high=3)


def test_registered_under_builtin_name():
    env = load_environment("guess", low=1, high=8)
    assert isinstance(env, GuessNumberEnv) and env.high == 8
    assert guess_problems([2, 5], low=1, high=8) == [
        {"secret": 2, "low": 1, "high": 8},
        {"secret": 5, "low": 1, "high": 8},
    ]


def _play(env, problem, style, max_turns, seed=0):
    rng = random.Random(seed)
    low, high = env.bounds(problem)
    history, guesses = [], []
    for turn in range(1, max_turns + 1):
        guess = scripted_guess(style, low, high, history, rng)
        guesses.append(guess)
        result = env.step(problem, f"<answer>{guess}</answer>", turn)
        if result.done:
            return guesses, turn
        history.append((guess, result.feedback))
    return guesses, None


def test_bisection_finds_every_secret_within_log2_turns():
    env = GuessNumberEnv(low=1, high=32)
    turns = [_play(env, {"secret": s}, "bisect", max_turns=6)[1] for s in range(1, 33)]
    assert all(t is not None for t in turns)
    assert max(turns) == 6 and sum(t <= 5 for t in turns) == 31  # 2^5 - 1 within 5 guesses
    assert _play(env, {"secret": 16}, "bisect", 6) == ([16], 1)


def test_habits_that_ignore_or_creep_on_the_feedback():
    env = GuessNumberEnv(low=1, high=32)
    assert _play(env, {"secret": 30}, "repeat", 5) == ([16] * 5, None)
    assert _play(env, {"secret": 19}, "step", 5) == ([16, 17, 18, 19], 4)
    assert _play(env, {"secret": 1}, "step", 5) == ([16, 15, 14, 13, 12], None)
    guesses, _ = _play(env, {"secret": 1}, "random", 5, seed=3)
    assert all(1 <= g <= 32 for g in guesses)


def test_consistent_range_ignores_unparsed_turns():
    history = [(16, HIGHER), (None, FORMAT_REMINDER), (24, LOWER)]
    assert consistent_range(1, 32, history) == (17, 23)
    with pytest.raises(ValueError, match="style"):
        scripted_guess("psychic", 1, 32, [], random.Random(0))
