"""Environments: answer extraction and checking rules, the registry, problem loading."""

from __future__ import annotations

import json

import pytest

from drift_engine.envs import DEFAULT_FEEDBACK, Environment, load_environment, load_problems
from drift_engine.envs.choice import ChoiceEnv, extract_choice
from drift_engine.envs.math import MathEnv, extract_math_answer, math_equal, normalize_math_answer
from drift_engine.errors import EnvironmentSpecError

# ---- math -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, answer",
    [
        ("1/2", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "\\dfrac12"),
        ("50", "50\\%"),
        ("0.5", "50%"),
        ("1000", "1,000"),
        ("1,000,000", "1000000"),
        ("x+1", "1+x"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("\\frac{\\pi}{2}", "\\pi/2"),
        ("5", "5 cm"),
        ("12", "\\$12"),
        ("5", "x = 5"),
        ("90", "90^\\circ"),
        ("(1,2)", "(1, 2)"),
        ("3", "\\text{3}"),
        ("Yes", "yes"),
        ("2", "2.0"),
        ("-3", "-3."),
    ],
)
def test_math_equivalent(reference, answer):
    assert math_equal(reference, answer, use_math_verify=False)


@pytest.mark.parametrize(
    "reference, answer",
    [
        ("2", "3"),
        ("1/3", "0.333"),
        ("(1,2)", "(2,1)"),
        ("[1,2)", "(1,2)"),  # intervals keep their ends
        ("yes", "sey"),  # words are not products of symbols
        ("5", "5x"),
        ("1000", "1,00"),
        ("2", "2\\pi"),  # "pi" is not a unit
        ("x+1", "x-1"),
        ("4", ""),
    ],
)
def test_math_not_equivalent(reference, answer):
    assert not math_equal(reference, answer, use_math_verify=False)


def test_math_verify_is_used_when_installed():
    pytest.importorskip("math_verify")
    # sets in any order: beyond the built-in rules, within math-verify's
    assert not math_equal("\\{1,2\\}", "\\{2,1\\}", use_math_verify=False)
    assert math_equal("\\{1,2\\}", "\\{2,1\\}", use_math_verify=True)
    assert not math_equal("\\{1,2\\}", "\\{1,3\\}", use_math_verify=True)
    assert MathEnv().use_math_verify


def test_math_symbolic_check_never_evaluates_arbitrary_code():
    assert not math_equal("1", "__import__('os').getcwd()", use_math_verify=False)
    assert not math_equal("1", "9^{9^{9}}", use_math_verify=False)  # power tower rejected fast


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then finally \\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
        ("<answer>42</answer>", "42"),
        ("\\boxed{1} and later <answer> 7 </answer>", "7"),
        ("<answer>\\boxed{3}</answer>", "3"),
        ("\\boxed 5$", "5"),
        ("no final answer", None),
        ("\\boxed{unclosed", None),
        ("<answer>  </answer>", None),
        ("<answer>12", None),
    ],
)
def test_math_extraction(text, expected):
    assert extract_math_answer(text) == expected


def test_math_env_steps_and_records_answers():
    env = MathEnv(use_math_verify=False)
    problem = {"question": "What is 1/2 + 1/4?", "answer": "The sum is \\boxed{\\frac{3}{4}}"}
    messages = env.initial_messages(problem)
    assert messages == [{"role": "user", "content": messages[0]["content"]}]
    assert "What is 1/2 + 1/4?" in messages[0]["content"] and "\\boxed{}" in messages[0]["content"]
    right = env.step(problem, "... so \\boxed{0.75}", 1)
    assert right.correct and right.done and right.reward == 1.0 and right.feedback is None
    wrong = env.step(problem, "\\boxed{1,000}", 2)
    assert not wrong.done and wrong.reward == 0.0 and wrong.feedback == DEFAULT_FEEDBACK
    assert wrong.answer == "1000"  # normalised, so repeats are recognised
    malformed = env.step(problem, "I think it is three quarters", 3)
    assert (
        malformed.answer is None and not malformed.parsed and malformed.feedback == DEFAULT_FEEDBACK
    )
    assert normalize_math_answer("\\left( 1, 2 \\right)") == "(1,2)"


def test_math_env_config_errors():
    with pytest.raises(EnvironmentSpecError, match="question"):
        MathEnv(prompt_template="Solve: {problem}")
    with pytest.raises(EnvironmentSpecError, match="needs the field"):
        MathEnv().validate_problem({"question": "1+1"})


# ---- choice -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, letters, expected",
    [
        ("Reasoning... Answer: C", "ABCD", "C"),
        ("The answer is (B).", "ABCD", "B"),
        ("(A) is wrong because ..., so (D)", "ABCD", "D"),
        ("<answer>C</answer>", "ABCD", "C"),
        ("<answer>(E)</answer>", "ABCD", None),  # not an option of this problem
        ("<answer>maybe</answer> Answer: B", "ABCD", None),  # a committed but invalid tag
        ("\\boxed{D}", "ABCD", "D"),
        ("B.", "ABCD", "B"),
        ("J", "ABCDEFGHIJ", "J"),
        ("I think the answer is a good one", "ABCD", None),
        ("the correct answer is option B, not (C)", "ABCD", "B"),
        ("nothing here", "ABCD", None),
    ],
)
def test_choice_extraction(text, letters, expected):
    assert extract_choice(text, letters) == expected


def test_choice_env_answers_as_letter_index_or_text():
    env = ChoiceEnv()
    base = {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"]}
    for answer in ("B", "(B)", 1, "Paris"):
        problem = {**base, "answer": answer}
        env.validate_problem(problem)
        assert env.step(problem, "Answer: B", 1).correct
        assert env.step(problem, "Answer: A", 1).answer == "A"
    content = env.initial_messages({**base, "answer": "B"})[0]["content"]
    assert "A. Rome\nB. Paris\nC. Oslo\nD. Bern" in content
    dict_problem = {"question": "Q", "choices": {"A": "x", "B": "y"}, "answer": "A"}
    assert env.step(dict_problem, "Answer: C", 1).answer is None  # C is not an option


def test_choice_env_bad_problems():
    env = ChoiceEnv()
    with pytest.raises(EnvironmentSpecError, match="not one of its option letters"):
        env.validate_problem({"question": "Q", "choices": ["x", "y"], "answer": "C"})
    with pytest.raises(EnvironmentSpecError, match="at most 10"):
        env.validate_problem({"question": "Q", "choices": list("abcdefghijk"), "answer": "A"})


# ---- registry and problems ------------------------------------------------------------------


class EchoEnv(Environment):
    name = "echo"

    def __init__(self, target: str = "ok"):
        self.target = target

    def initial_messages(self, problem):
        return [{"role": "user", "content": "say it"}]

    def step(self, problem, answer, turn):
        from drift_engine.envs import StepResult

        good = answer.strip() == self.target
        return StepResult(float(good), good, None if good else "no", answer.strip(), good)


def test_registry_builtins_and_import_paths():
    assert isinstance(load_environment("math"), MathEnv)
    assert load_environment("choice", feedback="Wrong.").feedback == "Wrong."
    env = load_environment(f"{__name__}:EchoEnv", target="hi")
    assert env.target == "hi"
    guess = load_environment("guess")
    assert guess.name == "guess"


@pytest.mark.parametrize(
    "spec, config, message",
    [
        ("nope", {}, "unknown environment"),
        ("no_such_package.mod:Env", {}, "cannot import"),
        (f"{__name__}:Missing", {}, "has no attribute"),
        (f"{__name__}:json", {}, "not a class"),
        ("math", {"temperature": 1}, "bad configuration"),
        ("json:dumps", {"obj": 1}, "not a drift_engine.envs.Environment"),
    ],
)
def test_registry_errors(spec, config, message):
    with pytest.raises(EnvironmentSpecError, match=message):
        load_environment(spec, **config)


def test_load_problems_field_mapping_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1", "solution": 2, "id": 7})
        + "\n\n"
        + json.dumps({"problem": "2+2", "solution": "4", "id": 8})
        + "\n"
    )
    problems = load_problems(
        path, fields={"question": "problem", "answer": "solution"}, env=MathEnv()
    )
    assert [p["question"] for p in problems] == ["1+1", "2+2"] and problems[0]["id"] == 7
    assert (
        len(load_problems(path, fields={"question": "problem", "answer": "solution"}, limit=1)) == 1
    )

    with pytest.raises(EnvironmentSpecError, match=r"p.jsonl:1: .*needs the field"):
        load_problems(path, env=MathEnv())
    with pytest.raises(EnvironmentSpecError, match="'question_text' not found"):
        load_problems(path, fields={"question": "question_text"})
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(EnvironmentSpecError, match="empty"):
        load_problems(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n[1, 2]\n')
    with pytest.raises(EnvironmentSpecError, match="bad.jsonl:2: expected a JSON object"):
        load_problems(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": \n')
    with pytest.raises(EnvironmentSpecError, match="not valid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    with pytest.raises(EnvironmentSpecError, match="not found"):
        load_problems(tmp_path / "absent.jsonl")


def test_hf_dataset_without_datasets_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(EnvironmentSpecError, match="needs the `datasets` package"):
        load_problems("hf:openai/gsm8k")
