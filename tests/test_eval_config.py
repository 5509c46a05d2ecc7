"""`drift-engine eval --config FILE.toml`: the file and the flags are one configuration
(EvalConfig), the flags override the file, unknown keys and bad values are one error line,
and run_eval is the library's whole evaluation."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from drift_engine.assets import asset_path
from drift_engine.cli import cli
from drift_engine.evaluate_config import EvalConfig, load_eval_config

MODEL = str(asset_path("guess-model"))
PROBLEMS = str(asset_path("guess-problems/eval.jsonl"))

_TOML = f"""
models = ["{MODEL}", "{MODEL}"]
labels = ["before", "after"]
problems = ["{PROBLEMS}"]
env = "guess"
limit = 2
max_turns = 2
max_new_tokens = 8
engine = "hf"
progress = false
"""

_FLAGS = [
    "--model", MODEL, "--model", MODEL, "--label", "before", "--label", "after",
    "--problems", PROBLEMS, "--env", "guess", "--limit", "2", "--max-turns", "2",
    "--max-new-tokens", "8", "--engine", "hf", "--no-progress",
]  # fmt: skip


@pytest.fixture
def captured(monkeypatch):
    """Run `eval` up to run_eval and keep the EvalConfig it was given."""
    import drift_engine.evaluate as evaluate

    seen = {}

    def record(config):
        seen["config"] = config
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(evaluate, "run_eval", record)
    return seen


def _invoke(*args):
    return CliRunner().invoke(cli, ["eval", *args])


def test_toml_equals_flags(tmp_path, captured):
    path = tmp_path / "eval.toml"
    path.write_text(_TOML + f'out = "{tmp_path / "o"}"\n')
    assert _invoke("--config", str(path)).exit_code == 0
    from_file = captured.pop("config")
    assert _invoke(*_FLAGS, "--out", str(tmp_path / "o")).exit_code == 0
    assert from_file == captured["config"]
    assert from_file == load_eval_config(path).validate()


def test_flags_and_set_override_the_file(tmp_path, captured):
    path = tmp_path / "eval.toml"
    path.write_text(_TOML + 'out = "o"\n')
    result = _invoke("--config", str(path), "--max-turns", "4", "--model", "x",
                     "--label", "only", "--set", "split=train")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert (config.max_turns, config.models, config.labels) == (4, ["x"], ["only"])
    assert config.split == "train" and config.limit == 2 and config.engine == "hf"


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('max_turns = "two"\n', "max_turns must be an integer"),
        ("max_turns = 0\n", "max_turns must be >= 1, got 0"),
        ('engine = "tpu"\n', "engine must be one of"),
        ('models = "m"\n', "models must be a list"),
        ("max_turns = [\n", "is not valid TOML"),
    ],
)
def test_bad_files_are_one_error_line(tmp_path, captured, text, message):
    path = tmp_path / "eval.toml"
    required = 'problems = ["p"]\nout = "o"\nenv = "guess"\n'
    if not text.startswith("models"):
        required += 'models = ["m"]\n'
    path.write_text(required + text)
    result = _invoke("--config", str(path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "config" not in captured


def test_a_required_key_missing_everywhere_is_clicks_missing_option(tmp_path, captured):
    path = tmp_path / "eval.toml"
    path.write_text('models = ["m"]\nenv = "guess"\nout = "o"\n')
    result = _invoke("--config", str(path))
    assert result.exit_code == 2 and "Missing option '--problems'" in result.output
    assert _invoke("--config", str(path), "--problems", PROBLEMS).exit_code == 0
    with pytest.raises(Exception, match="problems is not set"):
        EvalConfig(models=["m"], env="guess", out="o").validate()


def test_help_shows_each_default():
    help_text = CliRunner().invoke(cli, ["eval", "--help"]).output
    defaults = EvalConfig()
    for shown in ("--config", f"[default: {defaults.max_turns}]",
                  f"[default: {defaults.max_new_tokens}]", f"[default: {defaults.batch_size}]",
                  f"[default: {defaults.split}]", f"[default: {defaults.engine}]",
                  "[default: progress]", "the model folder's name"):  # fmt: skip
        assert shown in " ".join(help_text.split()), shown


def test_run_eval_is_the_whole_evaluation(tmp_path):
    from drift_engine.evaluate import run_eval

    config = EvalConfig(
        models=[MODEL], problems=[PROBLEMS], env="guess", limit=2, max_turns=2,
        max_new_tokens=8, engine="hf", progress=False, out=str(tmp_path / "o"),
    )  # fmt: skip
    results = run_eval(config)
    assert list(results) == ["eval"] and results["eval"][0].model == "guess-model"
    data = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [r["model"] for r in data["results"]] == ["guess-model"]
    assert (tmp_path / "o" / "eval.md").is_file() and (tmp_path / "o" / "eval.png").is_file()
