"""Environments: answer extraction and checking rules, the registry, problem loading."""

from __future__ import annotations

import json

import pytest

from drift_engine.envs import DEFAULT_FEEDBACK, Environment, load_environment, load_problems
from drift_engine.envs.base import PromptTemplateEnv
from drift_engine.envs.choice import ChoiceEnv, extract_choice
from drift_engine.envs.math import MathEnv, extract_math_answer, math_equal, normalize_math_answer
from drift_engine.errors import ConfigError, EnvironmentSpecError

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


def test_prompt_template_env_checks_its_options_and_builds_messages():
    class Riddle(PromptTemplateEnv):
        name = "riddle"
        template_fields = ("question", "hint")

        def initial_messages(self, problem):
            return self.prompt_messages(self.prompt_template.format(**problem))

        def step(self, problem, answer, turn):
            raise NotImplementedError

    env = Riddle(prompt_template="{question} ({hint})", system_prompt="Be brief.", feedback="No.")
    assert env.initial_messages({"question": "Q", "hint": "h"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q (h)"},
    ]
    assert env.config() == {
        "prompt_template": "{question} ({hint})",
        "system_prompt": "Be brief.",
        "feedback": "No.",
    }
    with pytest.raises(EnvironmentSpecError, match="riddle environment's option feedback"):
        Riddle(prompt_template="{question}", system_prompt=None, feedback=3)
    with pytest.raises(EnvironmentSpecError, match=r"fields \{question\}, \{hint\}"):
        Riddle(prompt_template="{question} {answer}", system_prompt=None, feedback="No.")


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


# ---- robustness: one answer never ends a rollout, scoring is bounded -----------------------


class _OneAnswerEngine:
    """Answers every prompt with ``answers[turn - 1]`` (byte-level tokenizer, stops at eos)."""

    def __new__(cls, tokenizer, answers):
        from drift_engine.rollout import Engine, Generation

        class Scripted(Engine):
            name = "scripted"

            def generate(self, prompts, params, seeds):
                out = []
                for prompt in prompts:
                    turn = prompt.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) // 2
                    ids = tokenizer.encode(answers[turn - 1], add_special_tokens=False)
                    out.append(Generation(ids + [tokenizer.eos_token_id], finish_reason="stop"))
                return out

        return Scripted()


HUGE = "9" * 5000  # int() refuses more than 4300 digits


def test_scoring_error_is_contained_counted_and_reported():
    """An answer that makes the environment raise gets reward 0; the rollout goes on."""
    from tokenizer_utils import make_chat_tokenizer

    from drift_engine.rollout import SamplingParams, collect_trajectories, to_rollout_set
    from drift_engine.rollout.loop import META_TURN_STATS, format_turn_stats, turn_stats_from_json

    tok = make_chat_tokenizer()
    env = load_environment("guess")
    huge = f"<answer>{HUGE}</answer>"
    engine = _OneAnswerEngine(tok, [huge, "<answer>7</answer>", huge])
    problems = [{"secret": 7}, {"secret": 9}]
    with pytest.warns(UserWarning, match=r"3 answers could not be scored by the 'guess' .*"
                      r"prompt 0, sample 0, turn 1: ValueError: Exceeds the limit"):  # fmt: skip
        run = collect_trajectories(
            engine, tok, env, problems, n=1, max_turns=3, sampling=SamplingParams(), seed=0,
            progress=False,
        )  # fmt: skip
    first, second = run.trajectories
    assert first.rewards == [0.0, 1.0] and first.answers == [None, "7"]
    assert second.rewards == [0.0, 0.0, 0.0] and second.answers == [None, "7", None]
    assert [k for k, _ in first.scoring_errors] == [1] and len(second.scoring_errors) == 2
    stats = turn_stats_from_json(to_rollout_set(run).metadata[META_TURN_STATS])
    assert [s.scoring_errors for s in stats] == [2, 0, 1]
    assert "3 answers could not be scored by the environment (reward 0)" in format_turn_stats(stats)


def test_eval_counts_scoring_errors():
    from tokenizer_utils import make_chat_tokenizer

    from drift_engine.evaluate import MultiAtKResult, evaluate_multi_at_k, format_table

    tok = make_chat_tokenizer()
    engine = _OneAnswerEngine(tok, [f"<answer>{HUGE}</answer>", "<answer>7</answer>"])
    with pytest.warns(UserWarning, match="could not be scored"):
        result = evaluate_multi_at_k(
            engine, tok, load_environment("guess"), [{"secret": 7}, {"secret": 8}], 2,
            model="m", benchmark="b",
        )  # fmt: skip
    assert result.multi_at_k == [0.0, 0.5] and result.scoring_errors == 2
    assert MultiAtKResult.from_json(result.to_json()) == result
    assert "m on b: 2 answers could not be scored (reward 0)" in format_table([result])


def test_score_answer_contains_errors_but_not_configuration_errors():
    from drift_engine.envs import score_answer

    class Fragile(Environment):
        def initial_messages(self, problem):
            return [{"role": "user", "content": "?"}]

        def step(self, problem, answer, turn):
            if answer == "config":
                raise EnvironmentSpecError("the problem lacks a field")
            return {}[answer]

    result = score_answer(Fragile(), {}, "boom", 1)
    assert (result.reward, result.done, result.correct, result.answer) == (0.0, False, False, None)
    assert result.error == "KeyError: 'boom'"
    with pytest.raises(EnvironmentSpecError, match="lacks a field"):
        score_answer(Fragile(), {}, "config", 1)


def test_math_answer_with_more_digits_than_int_converts():
    env = MathEnv()
    result = env.step({"question": "q", "answer": "12"}, f"<answer>{HUGE}</answer>", 1)
    assert not result.correct and result.error is None and result.answer == HUGE
    assert math_equal(HUGE, HUGE) and not math_equal(HUGE, "12")


@pytest.mark.parametrize(
    "text",
    ["\\boxed{" * 8000, "\\boxed" * 8000, "<answer>" * 8000, "\\fbox{" * 4000 + "x" * 20000],
)
def test_math_extraction_is_linear(text):
    """56k characters: quadratic scanning took minutes; linear takes milliseconds."""
    import time

    start = time.perf_counter()
    extract_math_answer(text)
    assert time.perf_counter() - start < 0.5
    assert extract_math_answer("\\boxed{" * 8000 + "\\boxed{4}") == "4"
    assert extract_math_answer("<answer>" * 8000 + "</answer><answer>5</answer>") == "5"
    assert extract_math_answer("\\boxed" * 8000 + " 6") == "6"


@pytest.mark.parametrize("text", ["<answer>" * 8000, "<answer>" * 8000 + "</answer>"])
def test_answer_tags_are_found_in_linear_time(text):
    import time

    from drift_engine.envs.guess import parse_guess

    for extract in (extract_math_answer, extract_choice, parse_guess):
        start = time.perf_counter()
        extract(text)
        assert time.perf_counter() - start < 0.5, extract
    assert parse_guess("<answer>" * 8000 + "3</answer>") is None  # lazy tag: "<answer>…3"
    assert parse_guess("<answer>1</answer>" * 3 + "<answer> 4 </answer>") == 4
    assert extract_choice("<answer>" * 8000 + "</answer><answer>(C)</answer>") == "C"


def test_math_scoring_runs_under_the_time_limit(monkeypatch):
    import time

    import drift_engine.envs.math as math_env

    def slow_normalise(answer):
        time.sleep(5)
        return answer

    monkeypatch.setattr(math_env, "normalize_math_answer", slow_normalise)
    env = MathEnv(sympy_timeout=0.2)
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="longer than sympy_timeout=0.2 s"):
        env.step({"question": "q", "answer": "1"}, "<answer>1</answer>", 1)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("value", [0, -1, 0.0, float("inf"), float("nan"), "2", True, None])
def test_sympy_timeout_must_be_positive(value):
    with pytest.raises(EnvironmentSpecError, match="sympy_timeout must be a positive number"):
        MathEnv(sympy_timeout=value)
    assert MathEnv(sympy_timeout=0.5).sympy_timeout == 0.5


@pytest.mark.parametrize(
    "spec, options, message",
    [
        ("guess", {"low": float("inf")}, "low must be an integer, got inf"),
        ("guess", {"high": float("nan")}, "high must be an integer, got nan"),
        ("guess", {"low": "abc"}, "low must be an integer, got 'abc'"),
        ("guess", {"low": 1.5}, "low must be an integer, got 1.5"),
        ("math", {"prompt_template": 5}, "option prompt_template must be str, got 5"),
        ("math", {"use_math_verify": "yes"}, "use_math_verify must be bool or null"),
        ("math", {"sympy_timeout": "abc"}, "sympy_timeout must be a positive number"),
        ("choice", {"feedback": 1}, "option feedback must be str"),
    ],
)
def test_env_options_are_checked(spec, options, message):
    """Values as ``--env-opt KEY=VALUE`` parses them (JSON, so Infinity/NaN are floats)."""
    with pytest.raises(EnvironmentSpecError, match=message):
        load_environment(spec, **options)
    assert load_environment("guess", low=2.0, high="9").config()["low"] == 2


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"question": "q", "answer": NaN}', "NaN is not a finite number"),
        (b'{"question": "q", "answer": Infinity}', "Infinity is not a finite number"),
        (b'{"question": "q", "answer": -Infinity}', "-Infinity is not a finite number"),
        (b'{"question": "q", "answer": 1e400}', "1e400 is not a finite number"),
        (b'{"question": "caf\xe9", "answer": "1"}', "not UTF-8 text"),
    ],
)
def test_problem_files_with_non_finite_numbers_or_bad_bytes(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": 2.5}\n' + line + b"\n")
    with pytest.raises(EnvironmentSpecError, match=f"p.jsonl:2: {message}"):
        load_problems(path, env=MathEnv())
    path.write_bytes(
        b'{"question": "ok", "answer": 2.5}\r\n{"question": "caf\xc3\xa9", "answer": 1}'
    )
    assert [p["question"] for p in load_problems(path)] == ["ok", "café"]


@pytest.mark.parametrize(
    "problem, message",
    [
        ({"secret": float("inf")}, "secret must be an integer, got inf"),
        ({"secret": 3.5}, "secret must be an integer, got 3.5"),
        ({"secret": 3, "low": "x"}, "low must be an integer"),
    ],
)
def test_guess_problems_with_non_integer_values(problem, message):
    with pytest.raises(EnvironmentSpecError, match=message):
        load_environment("guess").validate_problem(problem)


# ---- arithmetic word problems -----------------------------------------------------------


def test_word_problems_are_deterministic_and_shipped_as_generated(tmp_path):
    from drift_engine.envs.word_problems import generate_splits, shipped_problems, write_splits

    small = {"train": 30, "heldout": 10}
    assert generate_splits(3, small) == generate_splits(3, small)
    assert generate_splits(3, small) != generate_splits(4, small)
    assert generate_splits(3, small, "easy") != generate_splits(3, small)
    # The shipped files are exactly what the documented command writes.
    written = write_splits(tmp_path)
    assert len(written) == 4
    for path in written:
        level = "easy" if "-easy-" in path.name else "standard"
        split = path.stem.rsplit("-", 1)[-1]
        assert path.read_bytes() == shipped_problems(split, level).read_bytes()
    with pytest.raises(ConfigError, match="level must be one of standard, easy"):
        generate_splits(level="hard")


@pytest.mark.parametrize("level", ["standard", "easy"])
def test_word_problem_answers_are_right(level):
    import re

    from drift_engine.envs.word_problems import shipped_problems

    env = MathEnv()
    splits = {s: load_problems(shipped_problems(s, level), env=env) for s in ("train", "heldout")}
    assert [len(p) for p in splits.values()] == [1000, 400]
    questions = [{p["question"] for p in problems} for problems in splits.values()]
    assert not questions[0] & questions[1] and len(questions[0]) == 1000
    operand_counts, operators, templates = set(), set(), set()
    for problems in splits.values():
        for p in problems:
            expression = p["expression"]
            assert re.fullmatch(r"[\d ()+\-*]+", expression)
            value = eval(expression)  # digits, brackets, + - * only (checked above)
            assert value >= 0 and p["answer"] == str(value)
            # The question states the operands, in the expression's order.
            numbers = re.findall(r"\d+", expression)
            assert re.findall(r"\d+", p["question"]) == numbers
            operand_counts.add(len(numbers))
            operators |= set(re.findall(r"[+\-*]", expression))
            templates.add(p["template"])
    assert operand_counts == {2, 3} and operators == {"+", "-", "*"}
    assert len(templates) == (10 if level == "standard" else 5)
    if level == "easy":
        assert all(
            len(n) == 1 for p in splits["train"] for n in re.findall(r"\d+", p["expression"])
        )
    for p in splits["heldout"][:20]:
        assert env.step(p, f"so \\boxed{{{p['answer']}}}", 1).correct
        assert not env.step(p, f"<answer>{int(p['answer']) + 1}</answer>", 1).correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Ben has 6 + 2 = 8 apples.", "8"),
        ("The answer is 2.", "2"),
        ("She pays 1,250 dollars in total", "1250"),
        ("x = -3", "-3"),
        ("2.5 kg, then 7", "7"),
        ("it costs 2.50.", "2.50"),
        ("no digits here", None),
        ("item a3 only", None),
    ],
)
def test_last_number(text, expected):
    from drift_engine.envs.math import last_number

    assert last_number(text) == expected


def test_last_number_fallback_scores_prose_answers_only_when_asked():
    problem = {"question": "6 + 2?", "answer": "8"}
    prose = "Ben has 6 + 2 = 8 apples."
    assert not MathEnv().step(problem, prose, 1).correct
    lenient = MathEnv(last_number_fallback=True)
    assert lenient.step(problem, prose, 1).correct
    assert lenient.config()["last_number_fallback"] is True
    # A marked answer still wins over the prose around it.
    assert not lenient.step(problem, "\\boxed{7}, not 8", 1).correct
    assert not lenient.step(problem, "8 apples? No: 9", 1).correct
    with pytest.raises(EnvironmentSpecError, match="last_number_fallback"):
        MathEnv(last_number_fallback="yes")


@pytest.mark.parametrize(
    "options, content, message",
    [
        (["--env-opt", "low=Infinity"], b'{"secret": 3}', "low must be an integer, got inf"),
        (["--env-opt", "high=abc"], b'{"secret": 3}', "high must be an integer, got 'abc'"),
        ([], b'{"secret": NaN}', "p.jsonl:1: NaN is not a finite number"),
        ([], b'{"secret": "\xff"}', "p.jsonl:1: not UTF-8 text"),
        ([], b'{"secret": 2.5}', "secret must be an integer, got 2.5"),
    ],
)
def test_cli_bad_problems_and_env_options_give_one_error_line(tmp_path, options, content, message):
    from pathlib import Path

    from click.testing import CliRunner

    from drift_engine.cli import cli

    model = Path(__file__).parents[1] / "examples" / "guess-model"
    problems = tmp_path / "p.jsonl"
    problems.write_bytes(content + b"\n")
    args = ["eval", "--model", str(model), "--env", "guess", "--problems", str(problems)]
    result = CliRunner().invoke(cli, [*args, *options, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
