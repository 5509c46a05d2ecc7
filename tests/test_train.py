"""The weighted-SFT trainer: config, schedules, the step loss against the DRIFT reference,
gradient-accumulation invariance, exact resume after an interruption."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import VOCAB, base_config, exported_weights, make_model_dir, make_rollouts, run
from safetensors.torch import load_file

from drift_engine.data.rollouts import save_rollouts
from drift_engine.errors import ConfigError
from drift_engine.train.config import (
    ScheduleConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from drift_engine.train.metrics import MetricsWriter
from drift_engine.train.schedule import lr_multiplier


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from transformers import AutoTokenizer

    models = {arch: make_model_dir(root / arch, arch) for arch in ("qwen2", "llama")}
    tokenizer = AutoTokenizer.from_pretrained(models["qwen2"])
    rollouts = make_rollouts(tokenizer=tokenizer)
    data = root / "rollouts.safetensors"
    save_rollouts(data, rollouts)
    return {"root": root, "models": models, "data": data, "rollouts": rollouts}


# ----------------------------------------------------------------------------- config


def test_toml_config_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        'out = "runs/a"\nseed = 3\n'
        '[data]\npath = "r.safetensors"\nbatch_tokens = 4096\ngrad_accum = 2\n'
        '[model]\nname_or_path = "m"\n[model.lora]\nr = 8\ntarget_modules = ["q_proj"]\n'
        "[optim]\nlr = 1\nbetas = [0.9, 0.95]\n"
        '[schedule]\nname = "cosine"\n'
    )
    config = load_config(path)
    assert config.seed == 3 and config.data.grad_accum == 2
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)  # int accepted
    assert config.optim.betas == (0.9, 0.95)
    assert config.model.lora.target_modules == ["q_proj"]
    assert config.schedule.name == "cosine"
    # untouched sections keep their defaults (the DRIFT recipe)
    assert config.optim.weight_decay == 0.1 and config.schedule.warmup_ratio == 0.1

    config = apply_overrides(config, {"optim.lr": 2e-5, "data.max_steps": None, "seed": 5})
    assert config.optim.lr == 2e-5 and config.data.max_steps is None and config.seed == 5
    config.validate()


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[data]\npth = 'x'\n", "unknown key 'data.pth'"),
        ("learning_rate = 1e-5\n", "unknown key 'learning_rate'"),
        ("[model.lora]\nrank = 4\n", "unknown key 'model.lora.rank'"),
        ("[data]\nbatch_tokens = '16k'\n", "data.batch_tokens must be an integer"),
        ("[data]\nshuffle = 1\n", "data.shuffle must be true or false"),
        ("[data]\ntrain_turns = 'first'\n", "data.train_turns must be one of 'last', 'all'"),
        ("[optim]\nbetas = [0.9]\n", "optim.betas must have 2 items"),
        ("data = 3\n", "data must be a table"),
        ("[data\n", "not valid TOML"),
    ],
)
def test_toml_errors_name_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_non_utf8_toml_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from drift_engine.cli import cli

    path = tmp_path / "latin1.toml"
    path.write_bytes('out = "runs/d\xe9j\xe0"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)
    result = CliRunner().invoke(cli, ["train", "--config", str(path)])
    assert result.exit_code == 2 and result.output.startswith("error: config file"), result.output


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"out": ""}, "out is not set"),
        ({"data.path": ""}, "data.path is not set"),
        ({"optim.lr": 0.0}, "optim.lr must be > 0"),
        ({"data.grad_accum": 0}, "data.grad_accum must be >= 1"),
        ({"weighting.beta": -1.0}, "weighting.beta must be > 0"),
        ({"schedule.warmup_ratio": 1.5}, r"schedule.warmup_ratio must be in \[0, 1\]"),
        ({"checkpoint.keep_last": 0}, "checkpoint.keep_last must be >= 1"),
        ({"optim.lr": "fast"}, "optim.lr must be a number"),
        ({"optim.momentum": 0.9}, "unknown configuration key 'optim.momentum'"),
        ({"device": "gpu0"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    ],
)
def test_invalid_values(overrides, message):
    config = config_from_dict({"out": "o", "data": {"path": "d"}, "model": {"name_or_path": "m"}})
    with pytest.raises(ConfigError, match=message):
        apply_overrides(config, overrides).validate()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- schedule


def test_schedules():
    warm = ScheduleConfig(name="constant_with_warmup", warmup_ratio=0.1)
    # 10 steps: ceil(0.1 * 10) = 1 warmup step at lr 0, then the peak (HF's rounding)
    assert [lr_multiplier(warm, s, 10) for s in range(3)] == [0.0, 1.0, 1.0]
    warm20 = ScheduleConfig(warmup_ratio=0.1)
    assert [lr_multiplier(warm20, s, 40) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    cosine = ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    values = [lr_multiplier(cosine, s, 12) for s in range(12)]
    assert values[:3] == [0.0, 0.5, 1.0]
    assert values[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(
        a >= b for a, b in zip(values[2:], values[3:], strict=False)
    )  # decreasing after warmup
    assert values[-1] > 0.1 and lr_multiplier(cosine, 12, 12) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- metrics


def test_metrics_resume_drops_recomputed_steps(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write({"step": step, "loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn line of a killed run
    with MetricsWriter(tmp_path, resume_step=2) as writer:
        writer.write({"step": 3, "loss": 30.0})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ----------------------------------------------------------------------------- the step loss


def drift_reference_loss(model_dir, rollouts, rows, loss_mode, train_turns) -> float:
    """DRIFT's loss, computed as its reference trains: right-padded batch, eager
    attention, full fp32 logits, each trajectory's token-mean CE over its trained tokens
    times its weight, averaged over trajectories ("weighted": Σ w·ℓ / Σ w; "token": the
    weighted token mean)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    trained_mask = rollouts.trained_mask(train_turns)  # (T,)
    seqs = [rollouts.input_ids[rollouts.trajectory_slice(i)].long() for i in rows]
    masks = [trained_mask[rollouts.trajectory_slice(i)] for i in rows]
    longest = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, L)
    attention = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = s
        attention[b, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()  # (B, L, V)
    ce_sums, counts, weights = [], [], []
    for b, (s, trained) in enumerate(zip(seqs, masks, strict=True)):
        target = trained[1:].clone()  # token t is predicted at position t-1
        ce = F.cross_entropy(logits[b, : len(s) - 1], s[1:], reduction="none")  # (L_b - 1,)
        ce_sums.append(ce[target].sum())
        counts.append(int(target.sum()))
        weights.append(float(rollouts.weights[rows[b]]))
    w = torch.tensor(weights, dtype=torch.float64)
    per_traj = torch.stack(ce_sums).double() / torch.tensor(counts, dtype=torch.float64)
    if loss_mode == "trajectory":
        return float((w * per_traj).mean())
    if loss_mode == "weighted":
        return float((w * per_traj).sum() / w.sum())
    return float((w * torch.stack(ce_sums).double()).sum() / sum(counts))


@pytest.mark.parametrize(
    "loss_mode, train_turns, arch",
    [("trajectory", "last", "qwen2"), ("weighted", "all", "llama"), ("token", "last", "llama")],
)
def test_step_loss_equals_drift_reference(workspace, tmp_path, loss_mode, train_turns, arch):
    config = base_config(
        workspace,
        tmp_path / "out",
        **{
            "data.loss_mode": loss_mode,
            "data.train_turns": train_turns,
            "data.grad_accum": 64,  # one step holds every micro-batch
            "data.max_steps": 1,
            "model.name_or_path": str(workspace["models"][arch]),
        },
    )
    [record] = run(config)
    rollouts = workspace["rollouts"]
    assert record["trajectories"] == rollouts.num_trajectories
    assert record["tokens"] == rollouts.num_tokens  # no truncation, no padding
    expected = drift_reference_loss(
        workspace["models"][arch],
        rollouts,
        list(range(rollouts.num_trajectories)),
        loss_mode,
        train_turns,
    )
    # Both sides are fp32 sums over ~300 tokens; reassociation error is ~1e-6 relative.
    assert record["loss"] == pytest.approx(expected, rel=2e-5)


def test_gradient_accumulation_invariance(workspace, tmp_path):
    """The same trajectories per step, as 1 micro-batch or as several accumulated ones, give
    the same losses, gradient norms and parameters."""
    rollouts = workspace["rollouts"]
    total = rollouts.num_tokens
    one = base_config(
        workspace,
        tmp_path / "one",
        **{"data.batch_tokens": total, "data.grad_accum": 1, "data.epochs": 2},
    )
    many = base_config(
        workspace,
        tmp_path / "many",
        **{"data.batch_tokens": 96, "data.grad_accum": 64, "data.epochs": 2},
    )
    runs = [run(one), run(many)]
    assert [len(r) for r in runs] == [2, 2]  # one step per epoch, every trajectory in it
    for a, b in zip(*runs, strict=True):
        assert a["trajectories"] == b["trajectories"] == rollouts.num_trajectories
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam's per-element update is lr·m/(√v+ε) with |update| <= lr = 1e-3 (here clipped
    # gradients change its size only through m/√v); fp32 reassociation perturbs gradients
    # by ~1e-6 relative, so parameters agree to ~1e-9. A normaliser computed per
    # micro-batch would change the loss by a factor of ~3, caught above.
    final_one = exported_weights(tmp_path / "one" / "checkpoint-000002")
    final_many = exported_weights(tmp_path / "many" / "checkpoint-000002")
    initial = exported_weights_of_model(workspace["models"]["qwen2"])
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_many[name], tensor, rtol=1e-5, atol=1e-6)
    moved = max((final_one[n] - initial[n]).abs().max().item() for n in final_one)
    assert moved > 1e-4  # the steps did change the parameters


def exported_weights_of_model(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def test_resume_reproduces_uninterrupted_run(workspace, tmp_path):
    overrides = {
        "data.batch_tokens": 64,
        "data.grad_accum": 2,
        "data.epochs": 2,
        "data.max_steps": 4,  # crosses into the second epoch
        "checkpoint.every_steps": 2,
        "schedule.warmup_ratio": 0.5,  # the scheduler state matters across the resume
    }
    straight = run(base_config(workspace, tmp_path / "straight", **overrides))
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert straight[-1]["epoch"] == 1
    interrupted = run(base_config(workspace, tmp_path / "resumed", **overrides), stop_at=3)
    assert [r["step"] for r in interrupted] == [1, 2, 3]
    assert (tmp_path / "resumed" / "checkpoint-000002").is_dir()
    assert not (tmp_path / "resumed" / "checkpoint-000003").exists()
    resumed = run(
        base_config(workspace, tmp_path / "resumed", **overrides, **{"checkpoint.resume": "latest"})
    )
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed, strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens", "trajectories", "epoch"):
            assert a[key] == b[key], key
    final_a = exported_weights(tmp_path / "straight" / "checkpoint-000004")
    final_b = exported_weights(tmp_path / "resumed" / "checkpoint-000004")
    for name, tensor in final_a.items():
        assert torch.equal(final_b[name], tensor), name
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_output_folder_with_a_run_needs_resume(workspace, tmp_path):
    from drift_engine.train.loop import Trainer

    config = base_config(workspace, tmp_path / "out", **{"data.max_steps": 1})
    run(config)
    with pytest.raises(ConfigError, match="already holds a training run; pass --resume"):
        Trainer(config)
    with pytest.raises(ConfigError, match="not a trainer checkpoint"):
        Trainer(apply_overrides(config, {"checkpoint.resume": str(tmp_path)}))


def test_data_must_match_model(workspace, tmp_path):
    from drift_engine.errors import DriftError
    from drift_engine.train.loop import Trainer

    rollouts = workspace["rollouts"]
    bad_ids = rollouts.input_ids.clone()
    bad_ids[5] = VOCAB + 3  # a token the model cannot embed
    path = tmp_path / "bad.safetensors"
    save_rollouts(path, dataclasses.replace(rollouts, input_ids=bad_ids))
    config = base_config(workspace, tmp_path / "out", **{"data.path": str(path)})
    with pytest.raises(DriftError, match="vocabulary size"):
        Trainer(config)
