"""The trainer does not go bad silently and resumes safely: crafted checkpoints are refused
without running their payload, non-finite steps are skipped and stop the run, checkpoints
stay finite and complete, resume refuses changed settings, data/model mismatches are
found before training."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import VOCAB, base_config, exported_weights, make_rollouts, run

from drift_engine.cli import cli
from drift_engine.data.rollouts import RolloutSet, save_rollouts
from drift_engine.errors import CheckpointError, ConfigError, TrainingDivergedError
from drift_engine.train import checkpoint as checkpoint_module
from drift_engine.train.config import apply_overrides
from drift_engine.train.loop import Trainer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from test_train import make_model_dir
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("safety")
    models = {arch: make_model_dir(root / arch, arch) for arch in ("qwen2", "llama")}
    tokenizer = AutoTokenizer.from_pretrained(models["qwen2"])
    data = root / "rollouts.safetensors"
    rollouts = make_rollouts(tokenizer=tokenizer)
    save_rollouts(data, rollouts)
    return {"root": root, "models": models, "data": data, "rollouts": rollouts}


def train_cli(workspace, out: Path, *extra: str):
    args = [
        "train", "--data", str(workspace["data"]), "--model", str(workspace["models"]["qwen2"]),
        "--out", str(out), "--device", "cpu", "--batch-tokens", "96", "--lr", "1e-3",
        "--dtype", "float32", *extra,
    ]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def one_step_run(workspace, tmp_path):
    """An output folder holding checkpoint-000001 of a one-step run."""
    out = tmp_path / "run"
    result = train_cli(workspace, out, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- no code runs


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_crafted_dcp_metadata(workspace, one_step_run, tmp_path):
    marker = tmp_path / "pwned"
    metadata = one_step_run / "checkpoint-000001" / "trainer" / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(marker)))
    result = train_cli(workspace, one_step_run, "--max-steps", "2", "--resume")
    one_error_line(result, "refusing to load", "posix.system", "nothing in it was run")
    assert not marker.exists()


def test_resume_refuses_crafted_byte_entry(workspace, one_step_run, tmp_path):
    """A well-formed DCP checkpoint whose optimizer entry is a pickled payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    marker = tmp_path / "pwned"
    trainer = Trainer(base_config(workspace, tmp_path / "scratch", **{"data.max_steps": 1}))
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    optim_sd["param_groups"][0]["lr"] = _Payload(marker)
    dcp_dir = one_step_run / "checkpoint-000001" / "trainer" / "dcp"
    shutil.rmtree(dcp_dir)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(dcp_dir), no_dist=True)
    assert not marker.exists()

    result = train_cli(workspace, one_step_run, "--max-steps", "2", "--resume")
    one_error_line(result, "refusing to load")
    assert not marker.exists()


def test_resume_refuses_pickled_rng_file(workspace, one_step_run, tmp_path):
    marker = tmp_path / "pwned"
    rng = one_step_run / "checkpoint-000001" / "trainer" / "rng" / "rank00000.pt"
    torch.save({"torch": _Payload(marker)}, rng)
    result = train_cli(workspace, one_step_run, "--max-steps", "2", "--resume")
    one_error_line(result, "refusing to load", "rank00000.pt")
    assert not marker.exists()


# ----------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize("damage", ["truncate_distcp", "empty_metadata", "state_json", "scheduler"])
def test_corrupt_checkpoint_gives_one_error_line(workspace, one_step_run, damage):
    trainer_dir = one_step_run / "checkpoint-000001" / "trainer"
    if damage == "truncate_distcp":
        (shard,) = (trainer_dir / "dcp").glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "empty_metadata":
        (trainer_dir / "dcp" / ".metadata").write_bytes(b"")
    elif damage == "state_json":
        (trainer_dir / "state.json").write_text('{"step": 1, ')
    else:
        (trainer_dir / "scheduler.pt").write_bytes(b"PK\x03\x04 torn")
    result = train_cli(workspace, one_step_run, "--max-steps", "2", "--resume")
    one_error_line(result, "checkpoint-000001")


def test_resume_with_another_architecture_is_refused(workspace, one_step_run):
    llama = str(workspace["models"]["llama"])
    for extra in ([], ["--allow-config-change"]):
        result = train_cli(
            workspace, one_step_run, "--model", llama, "--max-steps", "2", "--resume", *extra
        )
        one_error_line(result, "qwen2", "llama", "another architecture")


def test_zero_trajectory_rollouts_file_is_an_error(workspace, tmp_path):
    empty = tmp_path / "empty.safetensors"
    save_rollouts(empty, RolloutSet.from_trajectories([], [], [], []))
    result = train_cli(workspace, tmp_path / "out", "--data", str(empty))
    one_error_line(result, "holds no trajectories")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- divergence


def _nan_loss_at(monkeypatch, bad_steps: set[int]) -> None:
    """The step loss is NaN at the given (1-based) steps: one micro-batch per step."""
    from drift_engine.train import loop

    real = loop.weighted_sft_loss
    calls = {"n": 0}

    def loss(model, batch, normalizer, **kwargs):
        calls["n"] += 1
        value = real(model, batch, normalizer, **kwargs)
        return value * math.nan if calls["n"] in bad_steps else value

    monkeypatch.setattr(loop, "weighted_sft_loss", loss)


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_nonfinite_step_is_skipped_and_training_goes_on(workspace, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    config = base_config(
        workspace, tmp_path / "out", **{"data.max_steps": 3, "optim.max_nonfinite_steps": 2}
    )
    snapshots, records = [], []
    trainer = Trainer(
        config, on_step_end=lambda r: (records.append(r), snapshots.append(_snapshot(trainer)))
    )
    trainer.fit()
    assert [r["skipped"] for r in records] == [False, True, False]
    assert math.isnan(records[1]["loss"])
    for name, tensor in snapshots[0].items():  # the skipped step changed nothing
        assert torch.equal(snapshots[1][name], tensor), name
    assert any(not torch.equal(snapshots[2][n], t) for n, t in snapshots[1].items())
    assert trainer.state.skipped_steps == 1
    weights = exported_weights(tmp_path / "out" / "checkpoint-000003")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nonfinite_steps_in_a_row_stop_the_run(workspace, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2, 3, 4, 5})
    out = tmp_path / "out"
    config = base_config(
        workspace,
        out,
        **{"data.max_steps": 6, "optim.max_nonfinite_steps": 2, "checkpoint.every_steps": 1,
           "checkpoint.keep_last": 1},
    )  # fmt: skip
    with pytest.raises(TrainingDivergedError, match="2 steps in a row up to step 3"):
        run(config)
    # Only the finite checkpoint of step 1: nothing was written from the bad steps, and
    # keep-last did not delete it.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    weights = exported_weights(out / "checkpoint-000001")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_divergence_exits_nonzero_with_one_line(workspace, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {1, 2})
    result = train_cli(
        workspace, tmp_path / "out", "--max-steps", "3", "--max-nonfinite-steps", "1"
    )
    one_error_line(result, "training diverged", "step 1")


def test_no_checkpoint_from_nonfinite_parameters(workspace, tmp_path):
    out = tmp_path / "out"
    config = base_config(workspace, out, **{"data.max_steps": 1, "checkpoint.keep_last": 1})
    trainer = Trainer(config)
    trainer.fit()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.inf
    trainer.state.step = 2
    with pytest.raises(TrainingDivergedError, match="parameters are not finite"):
        trainer._save()
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-000001"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.lr", math.inf),
        ("optim.weight_decay", math.nan),
        ("optim.grad_clip", math.inf),
        ("optim.eps", math.inf),
        ("optim.betas", (0.9, math.nan)),
        ("weighting.beta", math.inf),
    ],
)
def test_nonfinite_settings_are_rejected(workspace, tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be"):
        base_config(workspace, tmp_path, **{key: value}).validate()


def test_nonfinite_flag_exits_2(workspace, tmp_path):
    result = train_cli(workspace, tmp_path / "out", "--lr", "inf")
    one_error_line(result, "optim.lr must be a finite number")


# ----------------------------------------------------------------------------- resume


def test_resume_from_older_checkpoint_replaces_newer_ones(workspace, tmp_path):
    out = tmp_path / "out"
    overrides = {
        "data.max_steps": 4, "data.epochs": 2, "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 4,
    }  # fmt: skip
    run(base_config(workspace, out, **overrides))
    assert len(list(out.glob("checkpoint-*"))) == 4
    # Continue from step 2 with another learning rate, for 3 steps in all.
    resumed = apply_overrides(
        base_config(workspace, out, **overrides),
        {
            "data.max_steps": 3,
            "optim.lr": 3e-3,
            "checkpoint.resume": str(out / "checkpoint-000002"),
            "checkpoint.allow_config_change": True,
        },
    )
    trainer = Trainer(resumed)
    trainer.fit()
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000003",
    ]  # fmt: skip
    saved = exported_weights(out / "checkpoint-000003")  # this run's, not the old one's
    for name, param in trainer.model.state_dict().items():
        assert torch.equal(saved[name], param), name
    info = json.loads((out / "run.json").read_text())
    assert info["resume_overrides"] == [{"key": "optim.lr", "checkpoint": 1e-3, "now": 3e-3}]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_resume_from_another_folders_checkpoint_leaves_this_run_alone(workspace, tmp_path):
    overrides = {"data.max_steps": 2, "checkpoint.every_steps": 1, "checkpoint.keep_last": 4}
    run(base_config(workspace, tmp_path / "a", **overrides))
    out = tmp_path / "b"
    run(base_config(workspace, out, **overrides))
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = apply_overrides(
        base_config(workspace, out, **overrides),
        {"checkpoint.resume": str(tmp_path / "a" / "checkpoint-000001")},
    )
    with pytest.raises(ConfigError, match="checkpoint of another folder"):
        Trainer(other)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # Into an empty --out it is a fork of that run, and allowed.
    fork = apply_overrides(
        base_config(workspace, tmp_path / "fork", **overrides),
        {"checkpoint.resume": str(tmp_path / "a" / "checkpoint-000001")},
    )
    Trainer(fork).fit()
    assert sorted(p.name for p in (tmp_path / "fork").glob("checkpoint-*")) == ["checkpoint-000002"]
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == [
        "checkpoint-000001", "checkpoint-000002",
    ]  # fmt: skip


def test_resume_with_other_data_or_model_is_refused(workspace, tmp_path):
    out = tmp_path / "out"
    run(base_config(workspace, out, **{"data.max_steps": 1}))
    other = tmp_path / "other.safetensors"
    save_rollouts(other, make_rollouts(seed=1))
    moved = tmp_path / "moved.safetensors"
    shutil.copy(workspace["data"], moved)
    resume = {"data.max_steps": 2, "checkpoint.resume": "latest"}
    with pytest.raises(ConfigError, match=r"data \(content\)"):
        Trainer(base_config(workspace, out, **resume, **{"data.path": str(other)}))
    from test_train import make_model_dir

    another = make_model_dir(tmp_path / "another", "qwen2", seed=1)  # same architecture
    with pytest.raises(ConfigError, match="model.name_or_path: .* -> .*another"):
        Trainer(base_config(workspace, out, **resume, **{"model.name_or_path": str(another)}))
    # the same data at another path is the same data
    Trainer(base_config(workspace, out, **resume, **{"data.path": str(moved)})).fit()


def test_run_killed_before_its_first_checkpoint_continues_with_resume(workspace, tmp_path):
    out = tmp_path / "out"
    config = base_config(workspace, out, **{"data.max_steps": 3})
    run(config, stop_at=1)  # killed at step 1, before any checkpoint
    assert not list(out.glob("checkpoint-*")) and (out / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="pass --resume to continue it") as err:
        Trainer(config)
    assert "before its first one" in str(err.value)
    records = run(apply_overrides(config, {"checkpoint.resume": "latest"}))
    assert [r["step"] for r in records] == [1, 2, 3]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_interrupted_rotation_leaves_no_partial_checkpoint(workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = base_config(
        workspace,
        out,
        **{"data.max_steps": 2, "checkpoint.every_steps": 1, "checkpoint.keep_last": 1},
    )
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        # deletes the model files first, then the process dies
        for child in Path(path).glob("**/*.safetensors"):
            child.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert checkpoint_module.list_checkpoints(out) == [out / "checkpoint-000002"]
    assert (out / "checkpoint-000002" / "model" / "model.safetensors").is_file()
    # the next save clears the leftover
    trainer = Trainer(apply_overrides(config, {"checkpoint.resume": "latest", "data.max_steps": 3}))
    trainer.fit()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-000003"]


# ----------------------------------------------------------------------------- data vs model


def test_trajectories_longer_than_the_position_table(workspace, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    short = tmp_path / "short"
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(short)
    AutoTokenizer.from_pretrained(workspace["models"]["qwen2"]).save_pretrained(short)
    lengths = workspace["rollouts"].lengths()
    longest = int(lengths.argmax())
    settings = {"model.name_or_path": str(short), "data.max_steps": 1}
    with pytest.raises(ConfigError, match=rf"trajectory {longest} is {int(lengths.max())} tokens"):
        Trainer(base_config(workspace, tmp_path / "a", **settings))
    # truncation to the budget keeps every trajectory within the table
    Trainer(base_config(workspace, tmp_path / "b", **settings, **{"data.batch_tokens": 32}))


def test_model_without_tokenizer_files(workspace, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (workspace["models"]["qwen2"] / name).exists():
            shutil.copy(workspace["models"]["qwen2"] / name, bare / name)
    settings = {"model.name_or_path": str(bare), "data.max_steps": 1}
    with pytest.raises(ConfigError, match="no tokenizer files.*--no-check-tokenizer"):
        Trainer(base_config(workspace, tmp_path / "a", **settings))
    out = tmp_path / "b"
    run(base_config(workspace, out, **settings, **{"data.check_tokenizer": False}))
    info = json.loads((out / "run.json").read_text())
    assert info["tokenizer_check"].startswith("skipped")
    assert info["config"]["data"]["check_tokenizer"] is False


def test_load_checkpoint_refuses_unknown_state_fields(workspace, one_step_run):
    state = one_step_run / "checkpoint-000001" / "trainer" / "state.json"
    raw = json.loads(state.read_text())
    raw["__class__"] = "os.system"
    state.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown fields"):
        checkpoint_module.read_trainer_state(one_step_run / "checkpoint-000001")


def test_train_command_tears_the_process_group_down(workspace, tmp_path, monkeypatch):
    """Also when training fails after joining it (here: on an empty rollouts file)."""
    import torch.distributed as dist

    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: destroyed.append(True))
    empty = tmp_path / "empty.safetensors"
    save_rollouts(empty, RolloutSet.from_trajectories([], [], [], []))
    result = train_cli(workspace, tmp_path / "out", "--data", str(empty))
    one_error_line(result, "holds no trajectories")
    assert destroyed == [True]
