"""`drift-engine rollout --config FILE.toml`: the file, --set and the flags are one
configuration (RolloutConfig) with train's and eval's precedence, a bad value is one error
line, and run_rollout is the library's whole rollout."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from factories import PROBLEMS, save_tiny_model

from drift_engine.cli import cli
from drift_engine.data.rollouts import load_rollouts
from drift_engine.evaluate_config import EvalConfig
from drift_engine.rollout_config import EnvEngineConfig, RolloutConfig, load_rollout_config


@pytest.fixture
def captured(monkeypatch):
    """Run `rollout` up to run_rollout and keep the RolloutConfig it was given."""
    import drift_engine.rollout.run as run

    seen = {}

    def record(config, **kwargs):
        seen["config"] = config
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(run, "run_rollout", record)
    return seen


def _invoke(*args):
    return CliRunner().invoke(cli, ["rollout", *args])


_TOML = """
model = "m"
problems = "p.jsonl"
env = "math"
out = "r.safetensors"
n = 4
max_turns = 3
temperature = 0.5
engine = "hf"
progress = false
"""


def test_toml_then_set_then_flags(tmp_path, captured):
    path = tmp_path / "rollout.toml"
    path.write_text(_TOML)
    assert _invoke("--config", str(path)).exit_code == 0
    from_file = captured.pop("config")
    assert from_file == load_rollout_config(path).validate()
    assert (from_file.n, from_file.max_turns, from_file.progress) == (4, 3, False)

    flags = ["--model", "m", "--problems", "p.jsonl", "--env", "math", "--out", "r.safetensors",
             "-n", "4", "--max-turns", "3", "--temperature", "0.5", "--engine", "hf", "--quiet"]  # fmt: skip
    assert _invoke(*flags).exit_code == 0
    assert captured.pop("config") == from_file

    # --set overrides the file, a flag overrides both; --save-every is prompts_per_part.
    result = _invoke("--config", str(path), "--set", "max_turns=2", "--set", "seed=7",
                     "--n", "8", "--save-every", "3", "--progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert (config.max_turns, config.seed, config.n, config.prompts_per_part) == (2, 7, 8, 3)
    assert config.progress and config.temperature == 0.5 and config.engine == "hf"


def test_a_key_given_twice_is_refused(tmp_path, captured):
    path = tmp_path / "rollout.toml"
    path.write_text(_TOML)
    result = _invoke("--config", str(path), "--set", "n=2", "-n", "3")
    assert result.exit_code == 2 and "n is given twice" in result.output, result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("max_turns = 0\n", "max_turns must be >= 1, got 0"),
        ("prompts_per_part = 0\n", "(--save-every)"),
        ('seed = "zero"\n', "seed must be an integer"),
        ('engine = "tpu"\n', "engine must be one of"),
        ("gamma = 1.5\n", "gamma must be in [0, 1], got 1.5"),
        ('out = "r.json"\n', "out must end in .safetensors"),
        ('shards = ["a.safetensors"]\n', "with --merge only"),
    ],
)
def test_a_bad_value_is_one_error_line(tmp_path, captured, text, message):
    path = tmp_path / "rollout.toml"
    path.write_text('model = "m"\nproblems = "p.jsonl"\nenv = "math"\n' + text)
    out = [] if text.startswith("out") else ["--out", "r.safetensors"]
    result = _invoke("--config", str(path), *out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "config" not in captured


def test_merge_takes_only_merge_keys_from_a_file_too(tmp_path, captured):
    path = tmp_path / "merge.toml"
    path.write_text('merge = true\nshards = ["a.safetensors"]\nout = "r.safetensors"\nn = 3\n')
    result = _invoke("--config", str(path))
    assert result.exit_code == 2 and "--merge only takes shard files" in result.output
    assert "got --n." in result.output


def test_rollout_and_eval_share_the_env_and_engine_fields():
    shared = {f.name for f in EnvEngineConfig.__dataclass_fields__.values()}
    for cls in (RolloutConfig, EvalConfig):
        fields = cls.__dataclass_fields__
        assert all(fields[name] is EnvEngineConfig.__dataclass_fields__[name] for name in shared)
    help_text = CliRunner().invoke(cli, ["rollout", "--help"]).output
    assert help_text.index("--merge") < help_text.index("--env ")  # the command's own first


def test_run_rollout_is_the_whole_rollout(tmp_path):
    from drift_engine.rollout.run import run_rollout

    model = save_tiny_model(tmp_path / "model")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:2]))
    lines = []
    config = RolloutConfig(
        model=str(model), problems=str(problems), env="math", out=str(tmp_path / "r.safetensors"),
        n=2, max_turns=1, max_new_tokens=4, engine="hf", progress=False, gamma=0.9,
    )  # fmt: skip
    got = run_rollout(config, echo=lines.append)
    written = load_rollouts(tmp_path / "r.safetensors")
    assert got.num_trajectories == written.num_trajectories == 4 and written.weights is not None
    assert "4 trajectories of 2 problems" in lines[0]
