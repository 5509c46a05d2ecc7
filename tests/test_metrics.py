"""Training metrics beyond metrics.jsonl: importance-weight statistics (ESS), TensorBoard
through report_to, plain log lines without a progress bar, and the --report-to flag."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from factories import make_model_dir, make_rollouts

from drift_engine.cli import cli
from drift_engine.data.rollouts import save_rollouts
from drift_engine.errors import ConfigError
from drift_engine.train import metrics as metrics_module
from drift_engine.train.config import config_from_dict
from drift_engine.train.metrics import MetricsWriter, check_report_to, weight_stats


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_weight_stats_effective_sample_size():
    weights = torch.tensor([9.0, 1.0, 2.0, 0.0, 3.0])
    stats = weight_stats(weights, [[1, 2], [4]])  # rows 1, 2, 4: w = 1, 2, 3
    assert stats["weight_ess"] == pytest.approx(36 / 14)  # (Σw)² / Σw²
    assert stats["weight_ess_fraction"] == pytest.approx(36 / 14 / 3)
    assert (stats["weight_mean"], stats["weight_min"], stats["weight_max"]) == (2.0, 1.0, 3.0)
    assert weight_stats(weights, [[1, 1, 1]])["weight_ess_fraction"] == pytest.approx(1.0)
    assert weight_stats(weights, [[0, 3, 3]])["weight_ess"] == pytest.approx(1.0)  # one carries it
    assert weight_stats(weights, [[3]])["weight_ess"] == 0.0  # all zero


def test_report_to_is_checked(monkeypatch):
    assert check_report_to(["none"]) == []
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        check_report_to(["tensorbord"])
    real = metrics_module.importlib.util.find_spec
    monkeypatch.setattr(
        metrics_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="needs the wandb package: pip install wandb"):
        config_from_dict(
            {
                "out": "o",
                "data": {"path": "d"},
                "model": {"name_or_path": "m"},
                "report_to": ["wandb"],
            }
        ).validate()


def test_tensorboard_scalars_and_resume(tmp_path):
    def record(step, loss):
        return {"step": step, "epoch": 0, "loss": loss, "lr": 1e-3, "flag": True, "note": "x"}

    with MetricsWriter(tmp_path, report_to=["tensorboard"], run_config={"seed": 0}) as writer:
        for step in (1, 2, 3):
            writer.write(record(step, 10.0 + step))
    # Resumed from the checkpoint of step 1: steps 2 and 3 are recomputed and logged once.
    with MetricsWriter(tmp_path, resume_step=1, report_to=["tensorboard"]) as writer:
        for step in (2, 3):
            writer.write(record(step, 20.0 + step))
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 11.0), (2, 22.0), (3, 23.0)]
    assert "train/flag" not in scalars and "train/note" not in scalars  # numbers only
    assert {"train/epoch", "train/lr"} <= scalars.keys()


def test_plain_log_lines(tmp_path):
    stream = io.StringIO()
    writer = MetricsWriter(
        tmp_path, log_lines=True, total_steps=4, log_interval_s=3600, stream=stream
    )
    for step in (1, 2, 3, 4):
        writer.write({"step": step, "loss": 1.5, "lr": 2e-5, "grad_norm": 0.5,
                      "tokens_per_s": 12345.6, "weight_ess_fraction": 0.75})  # fmt: skip
    writer.close()
    lines = stream.getvalue().splitlines()  # the first and last step only, within the hour
    assert len(lines) == 2
    assert lines[0].startswith("step 1/4 | loss 1.5000 | lr 2.00e-05 | grad_norm 0.5")
    assert "tok/s 12,346 | ess 0.75 | eta " in lines[0]
    assert lines[1].startswith("step 4/4 |") and "eta" not in lines[1]
    stream = io.StringIO()
    (tmp_path / "b").mkdir()
    with MetricsWriter(tmp_path / "b", log_lines=True, log_interval_s=0, stream=stream) as w:
        for step in (1, 2, 3):
            w.write({"step": step, "loss": 1.0})
    assert [x.split(" |")[0] for x in stream.getvalue().splitlines()] == [
        "step 1", "step 2", "step 3",
    ]  # fmt: skip


def test_train_cli_reports_to_tensorboard(tmp_path):
    from transformers import AutoTokenizer

    model = make_model_dir(tmp_path / "model", "qwen2")
    rollouts = make_rollouts(tokenizer=AutoTokenizer.from_pretrained(model))
    data = tmp_path / "rollouts.safetensors"
    save_rollouts(data, rollouts)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", str(model), "--out", str(out),
            "--max-steps", "2", "--batch-tokens", "96", "--device", "cpu"]  # fmt: skip
    config = tmp_path / "train.toml"
    config.write_text("progress = false\n")  # plain log lines instead of the bar
    result = CliRunner().invoke(
        cli,
        [*args, "--config", str(config), "--report-to", "tensorboard, none"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "step 1/2 | loss " in result.output and "step 2/2 | loss " in result.output

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(out / "tensorboard")
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "weight_ess", "weight_mean"):
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx(
            [r[name] for r in lines]
        ), name
    for r in lines:
        assert 0 < r["weight_ess_fraction"] <= 1
        assert r["weight_ess"] == pytest.approx(r["weight_ess_fraction"] * r["trajectories"])

    result = CliRunner().invoke(cli, [*args[:6], str(tmp_path / "x"), "--report-to", "neptune"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: report_to: unknown tracker 'neptune' (known: tensorboard, wandb, mlflow, none)"
    ]
    assert math.isfinite(lines[-1]["loss"])


def test_evaluation_during_training(tmp_path):
    from test_rollout import PROBLEMS, save_tiny_model
    from transformers import AutoTokenizer

    from drift_engine.data.rollouts import RolloutSet, tokenizer_fingerprint
    from drift_engine.envs import load_environment
    from drift_engine.evaluate import evaluate_multi_at_k
    from drift_engine.rollout.hf import HFEngine
    from drift_engine.train.loop import train

    model = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(4, len(tokenizer), (n,), generator=g).tolist() for n in (9, 12, 7, 10)]
    turns = [[0] * (n - 4) + [1] * 4 for n in (9, 12, 7, 10)]
    rollouts = RolloutSet.from_trajectories(
        tokens, turns, [0, 0, 1, 1], [[1.0], [0.0], [0.0], [1.0]],
        metadata=tokenizer_fingerprint(tokenizer),
    )  # fmt: skip
    data = tmp_path / "rollouts.safetensors"
    save_rollouts(data, rollouts)
    problems = tmp_path / "held_out.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    config = config_from_dict(
        {
            "out": str(tmp_path / "run"),
            "progress": False,
            "device": "cpu",
            "report_to": ["tensorboard"],
            "data": {"path": str(data), "batch_tokens": 24, "max_steps": 3, "epochs": 3},
            "model": {"name_or_path": str(model), "dtype": "float32"},
            "optim": {"lr": 1e-2},
            "eval": {
                "problems": str(problems),
                "env": "math",
                "every_steps": 2,
                "max_turns": 2,
                "max_new_tokens": 4,
            },
        }  # fmt: skip
    ).validate()
    result = train(config)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in lines if "eval_multi_at_1" in r]
    assert evaluated == [2, 3]  # every 2 steps, and after the last
    # The last evaluation is the final model's multi@k, as drift-engine eval computes it.
    final = evaluate_multi_at_k(
        HFEngine.from_pretrained(str(result.model), device="cpu"),
        tokenizer,
        load_environment("math"),
        [json.loads(x) for x in problems.read_text().splitlines()],
        2,
        max_new_tokens=4,
    )
    assert [lines[-1]["eval_multi_at_1"], lines[-1]["eval_multi_at_2"]] == [
        final.at(1),
        final.at(2),
    ]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train/eval_multi_at_2"]] == [2, 3]

    with pytest.raises(ConfigError, match="eval.env is not set"):
        config_from_dict(
            {"out": "o", "data": {"path": "d"}, "model": {"name_or_path": "m"},
             "eval": {"problems": "p.jsonl"}}
        ).validate()  # fmt: skip


def _fake_module(monkeypatch, name, **attrs):
    import importlib.machinery
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_and_mlflow_calls(tmp_path, monkeypatch):
    """The trackers' calls, on stand-ins that record them (neither package is installed
    here): one run per training run, resumed under the same wandb id, metrics per step."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("wandb.log", data, step))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kwargs):
        calls.append(("wandb.init", kwargs))
        return Run()

    _fake_module(
        monkeypatch,
        "wandb",
        init=init,
        util=types.SimpleNamespace(generate_id=iter(["abc123", "other"]).__next__),
    )
    _fake_module(
        monkeypatch,
        "mlflow",
        set_experiment=lambda name: calls.append(("mlflow.set_experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start_run", run_name)),
        log_params=lambda params: calls.append(("mlflow.log_params", params)),
        log_metrics=lambda metrics, step: calls.append(("mlflow.log_metrics", metrics, step)),
        end_run=lambda: calls.append(("mlflow.end_run",)),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"seed": 3, "optim": {"lr": 0.1}}
    with MetricsWriter(run_dir, report_to=["wandb", "mlflow"], run_config=config) as writer:
        writer.write({"step": 1, "loss": 2.0, "note": "x"})
    with MetricsWriter(run_dir, resume_step=1, report_to=["wandb"], run_config=config) as writer:
        writer.write({"step": 2, "loss": 1.0})
    inits = [c[1] for c in calls if c[0] == "wandb.init"]
    assert [(i["id"], i["resume"], i["name"], i["config"]) for i in inits] == [
        ("abc123", "allow", "run", config)
    ] * 2
    assert [c for c in calls if c[0] == "wandb.log"] == [
        ("wandb.log", {"train/loss": 2.0}, 1),
        ("wandb.log", {"train/loss": 1.0}, 2),
    ]
    assert ("mlflow.log_params", {"seed": 3, "optim.lr": 0.1}) in calls
    assert ("mlflow.log_metrics", {"train/loss": 2.0}, 1) in calls
    assert calls.count(("wandb.finish",)) == 2 and calls.count(("mlflow.end_run",)) == 1
