"""The command line as a whole: click's own usage errors, the same dtype names and the same
way of showing defaults on every subcommand, train's --set and flag precedence, and eval's
--label, --overwrite and progress bar."""

from __future__ import annotations

import json
from typing import get_args

import click
import pytest
from click.testing import CliRunner

from drift_engine.assets import asset_path
from drift_engine.cli import _COMMANDS, cli
from drift_engine.train.config import DTypeName, TrainConfig

_UNSET = getattr(click.core, "UNSET", None)  # click >= 8.2: an option without a default


def _commands() -> dict[str, tuple[click.Context, click.Command]]:
    """Each subcommand with a context under the group's (its context_settings apply)."""
    group_ctx = cli.make_context("drift-engine", [], resilient_parsing=True)
    found = {}
    for name in _COMMANDS:
        command = cli.get_command(group_ctx, name)
        found[name] = (
            command.make_context(name, [], parent=group_ctx, resilient_parsing=True),
            command,
        )
    return found


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--bogus"], "No such option"),
        (["eval", "--model", "m", "--env", "guess", "--out", "o"], "Missing option '--problems'"),
        (["rollout", "--out", "r.safetensors", "--dtype", "bf16"], "'bf16' is not one of"),
        (["train", "--schedule", "linear"], "'linear' is not one of"),
        (["demo", "--steps", "0"], "--steps"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_error_line_exit_2(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0] and "--help" in lines[0]
    assert "Usage:" not in result.output


def test_help_and_version_still_exit_0():
    runner = CliRunner()
    bare = runner.invoke(cli, [])  # no subcommand: the help, not an error line
    assert "Commands:" in bare.output and "error:" not in bare.output
    assert runner.invoke(cli, ["--help"]).exit_code == 0
    assert runner.invoke(cli, ["train", "--help"]).exit_code == 0
    assert runner.invoke(cli, ["--version"]).exit_code == 0


def test_every_dtype_option_takes_the_same_names():
    choices = {
        name: tuple(param.type.choices)
        for name, (_, command) in _commands().items()
        for param in command.params
        if param.name == "dtype"
    }
    assert {"rollout", "eval", "train"} <= choices.keys()
    assert set(choices.values()) == {get_args(DTypeName)}


def test_every_default_is_shown_in_help():
    shown = 0
    for name, (ctx, command) in _commands().items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            default = param.get_default(ctx, call=False)
            if (
                default in (None, _UNSET)
                or default == ()
                or (param.is_bool_flag and not param.secondary_opts and not default)
            ):
                continue  # nothing to show: unset, repeatable, or an off switch
            record = param.get_help_record(ctx)
            assert "[default: " in record[1], (name, param.name, record)
            shown += 1
    assert shown > 30
    # train's flags show TrainConfig's values
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert f"[default: {TrainConfig().data.batch_tokens}]" in help_text


@pytest.fixture
def captured_train_config(monkeypatch):
    """Run `train` up to the Trainer and keep the TrainConfig it was given."""
    import drift_engine.train.loop as loop

    seen = {}

    class Recorder:
        def __init__(self, config, **kwargs):
            seen["config"] = config
            raise click.exceptions.Exit(0)

    monkeypatch.setattr(loop, "Trainer", Recorder)
    return seen


def test_train_precedence_file_then_set_then_flags(tmp_path, captured_train_config):
    config = tmp_path / "train.toml"
    config.write_text("[data]\nbatch_tokens = 128\n[optim]\nlr = 1e-2\n")
    args = ["train", "--config", str(config), "--data", "r.safetensors", "--model", "m"]
    result = CliRunner().invoke(
        cli,
        [
            *args,
            "--out",
            "o",
            "--lr",
            "1e-3",
            "--set",
            "optim.betas=[0.9, 0.95]",
            "--set",
            "schedule.min_lr_ratio=0.1",
            "--set",
            'data.train_turns="all"',
            "--no-progress",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    got = captured_train_config["config"]
    assert got.data.batch_tokens == 128  # from the file: flag defaults do not override it
    assert got.optim.lr == 1e-3  # the flag given
    assert list(got.optim.betas) == [0.9, 0.95] and got.schedule.min_lr_ratio == 0.1
    assert got.data.train_turns == "all" and got.progress is False
    assert got.data.grad_accum == TrainConfig().data.grad_accum


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "1e-3", "--set", "optim.lr=1e-4"], "optim.lr is given twice"),
        (["--set", "optim.lr"], "must look like KEY=VALUE"),
        (["--set", "optim.nope=1"], "unknown configuration key 'optim.nope'"),
        (["--set", "data.batch_tokens=many"], "data.batch_tokens"),
    ],
)
def test_train_set_errors(extra, message, captured_train_config):
    args = ["train", "--data", "r.safetensors", "--model", "m", "--out", "o", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert "config" not in captured_train_config


def _eval(out, *extra):
    model = str(asset_path("guess-model"))
    problems = str(asset_path("guess-problems/eval.jsonl"))
    args = [
        "eval", "--model", model, "--model", model, "--env", "guess", "--problems", problems,
        "--limit", "2", "--max-turns", "2", "--max-new-tokens", "8", "--engine", "hf",
        "--out", str(out), *extra,
    ]  # fmt: skip
    return CliRunner().invoke(cli, args)


def test_eval_labels_overwrite_and_progress(tmp_path):
    out = tmp_path / "eval"
    result = _eval(out, "--label", "before", "--label", "after", "--no-progress")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in data["results"]] == ["before", "after"]
    assert "| before |" in (out / "eval.md").read_text()
    assert "traj" not in result.stderr  # no progress bar

    again = _eval(out)
    assert again.exit_code == 2 and "--overwrite" in again.output, again.output
    assert json.loads((out / "eval.json").read_text()) == data  # left alone

    result = _eval(out, "--overwrite", "--progress")
    assert result.exit_code == 0, result.output
    assert "traj" in result.stderr  # the progress bar of each model's episodes
    labels = [r["model"] for r in json.loads((out / "eval.json").read_text())["results"]]
    assert labels == ["guess-model", "guess-model-2"]


def test_eval_checks_out_before_any_work(tmp_path, monkeypatch):
    """--out under a regular file, or in a folder that cannot be written, is refused before
    a model loads (it used to fail at the end, after every episode)."""
    from drift_engine.rollout import hf

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(hf.HFEngine, "from_pretrained", no_loading)
    (tmp_path / "afile").write_text("")
    result = _eval(tmp_path / "afile" / "eval")
    assert result.exit_code == 2 and "afile' is a file, not a folder" in result.output, result.output
    result = _eval(tmp_path / "afile")
    assert result.exit_code == 2 and "is a file; give a folder" in result.output, result.output


@pytest.mark.parametrize(
    "labels, message",
    [(["only-one"], "got 1 --label for 2 --model"), (["x", "x"], "'x' is given twice")],
)
def test_eval_bad_labels(tmp_path, labels, message):
    result = _eval(tmp_path / "eval", *[a for label in labels for a in ("--label", label)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "eval").exists()


def test_gamma_and_beta_are_one_option_on_every_command():
    """--gamma/--beta on train, rollout, convert and demo: the same names and type, the
    same help (WeightingConfig's, with the same rule), the same range checked the same way."""
    from drift_engine.weighting_config import WeightingConfig

    commands = _commands()
    fields = WeightingConfig.__dataclass_fields__
    for name in ("train", "rollout", "convert", "demo"):
        ctx, command = commands[name]
        params = {p.name: p for p in command.params}
        for option in ("gamma", "beta"):
            param = params[option]
            assert param.opts == [f"--{option}"] and param.type is click.FLOAT, (name, option)
            assert param.help.startswith(fields[option].metadata["help"]), (name, option)
            if name == "demo":  # the demo always weights: the defaults are shown
                assert param.get_default(ctx, call=False) == getattr(WeightingConfig(), option)
            else:
                assert param.get_default(ctx, call=False) is None
                assert "Giving --gamma or --beta" in param.help, (name, option)

    required = {
        "train": ["--data", "r.safetensors", "--model", "m", "--out", "o"],
        "rollout": ["--out", "r.safetensors"],
        "convert": ["in.jsonl", "--tokenizer", "t", "--out", "o.safetensors"],
        "demo": [],
    }
    for name, args in required.items():
        for flag, value, message in [
            ("--gamma", "1.5", "gamma must be in [0, 1], got 1.5"),
            ("--beta", "0", "beta must be > 0, got 0.0"),
        ]:
            result = CliRunner().invoke(cli, [name, *args, flag, value])
            assert result.exit_code == 2, (name, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
            assert message in lines[0], (name, result.output)
