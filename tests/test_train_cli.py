"""``drift-engine train`` end to end on a tiny model, and its one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from factories import make_model_dir, make_rollouts

from drift_engine.cli import cli
from drift_engine.data.rollouts import META_TOKENIZER_VOCAB_HASH, save_rollouts

REQUIRED_METRICS = {
    "step", "epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "trajectories",
    "tokens_per_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("cli")
    model = make_model_dir(root / "model", "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = root / "rollouts.safetensors"
    save_rollouts(data, make_rollouts(tokenizer=tokenizer))
    return {"root": root, "model": model, "data": data, "tokenizer": tokenizer}


def invoke(*args: str):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def test_train_end_to_end(inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "train.toml"
    config.write_text(
        "[data]\nbatch_tokens = 128\n[optim]\nlr = 1e-2\nweight_decay = 0.0\n"
        "[schedule]\nwarmup_ratio = 0.0\n[checkpoint]\nkeep_last = 1\n"
    )
    out = tmp_path / "run"
    common = ["--data", str(inputs["data"]), "--model", str(inputs["model"]), "--out", str(out)]
    result = invoke(
        *common, "--config", str(config), "--max-steps", "2", "--lr", "1e-3", "--save-every", "1",
        "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output

    # keep_last = 1: only the final checkpoint is left, and no temporary folder
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-000002", "metrics.jsonl", "run.json",
    ]  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(REQUIRED_METRICS <= r.keys() for r in lines)
    assert 0 < lines[0]["packing_efficiency"] <= 1
    assert all(r["lr"] == 1e-3 for r in lines)  # the flag overrides the TOML file
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["optim"]["weight_decay"] == 0.0  # the TOML file was read
    assert run["config"]["data"]["batch_tokens"] == 128

    # The export loads with transformers and differs from the initial weights.
    checkpoint = out / "checkpoint-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model", "trainer"]
    assert "model: " + str(checkpoint / "model") in result.output
    card = (checkpoint / "model" / "README.md").read_text()
    assert f"base_model: {inputs['model']}" in card and str(inputs["data"]) in card
    checkpoint = checkpoint / "model"  # the Hugging Face export, alone in its folder
    assert not (checkpoint / "trainer").exists()
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    initial = AutoModelForCausalLM.from_pretrained(inputs["model"])
    assert AutoTokenizer.from_pretrained(checkpoint).get_vocab() == inputs["tokenizer"].get_vocab()
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.parameters(), initial.parameters(), strict=True)
    ]
    assert all(changed)

    # Resuming a finished run trains nothing, says why and how to go on, and leaves the
    # output folder as it was.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    resume = ["--config", str(config), "--resume", "--device", "cpu"]
    result = invoke(*common, *resume, "--max-steps", "2", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" not in result.output
    assert (
        f"nothing trained: the checkpoint {out / 'checkpoint-000002'} is at step 2, already at "
        "--max-steps 2; pass a larger --max-steps to train further"
    ) in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # Resuming with another learning rate (the TOML file's, without the flag) is refused,
    # unless asked for; then run.json records the change. A larger --max-steps extends the
    # run.
    result = invoke(*common, *resume, "--max-steps", "3")
    assert result.exit_code == 2
    assert "optim.lr: 0.001 -> 0.01" in result.output and "--allow-config-change" in result.output
    assert json.loads((out / "run.json").read_text())["config"]["optim"]["lr"] == 1e-3
    resume.append("--allow-config-change")
    result = invoke(*common, *resume, "--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output
    assert (out / "checkpoint-000003").is_dir()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    overrides = json.loads((out / "run.json").read_text())["resume_overrides"]
    assert overrides == [{"key": "optim.lr", "checkpoint": 1e-3, "now": 1e-2}]

    # A checkpoint past --max-steps: nothing trained, the newer checkpoint is kept.
    result = invoke(*common, *resume, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert "is at step 3, past --max-steps 2" in result.output
    assert (out / "checkpoint-000003").is_dir()

    # Without --max-steps the run goes on to the end of its epoch and stops there; a larger
    # --epochs extends it.
    assert invoke(*common, *resume).exit_code == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    result = invoke(*common, *resume)
    assert result.exit_code == 0, result.output
    assert (
        f"is at step {last}, the end of the run's 1 epoch(s) ({last} steps); pass a larger "
        "--epochs to train further"
    ) in result.output
    result = invoke(*common, *resume, "--epochs", "2")
    assert result.exit_code == 0, result.output
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert steps > last and f"trained {steps} steps" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0"], "optim.lr must be > 0"),
        (["--batch-tokens", "8"], "cannot fit the token budget 8"),
        (["--resume"], "no checkpoint found"),
        (["--config", "MISSING.toml"], "cannot read config file"),
        (["--config", "BAD.toml"], "unknown key 'optim.learning_rate'"),
        (["--data", "NOFILE"], "NOFILE"),
        (["--data", "OTHER_TOKENIZER"], "tokenizer mismatch"),
    ],
)
def test_bad_input_exits_2_with_one_line(inputs, tmp_path, extra, message):
    def path_for(name: str) -> str:
        if name == "BAD.toml":
            (tmp_path / name).write_text("[optim]\nlearning_rate = 1e-5\n")
        if name == "OTHER_TOKENIZER":
            # the same tokens, recorded as sampled with a tokenizer of another vocabulary
            other = make_rollouts(tokenizer=inputs["tokenizer"])
            stored = other.metadata[META_TOKENIZER_VOCAB_HASH]
            other.metadata[META_TOKENIZER_VOCAB_HASH] = stored[::-1]
            save_rollouts(tmp_path / "other.safetensors", other)
            return str(tmp_path / "other.safetensors")
        return str(tmp_path / name)

    placeholders = ("MISSING.toml", "BAD.toml", "NOFILE", "OTHER_TOKENIZER")
    extra = [path_for(x) if x in placeholders else x for x in extra]
    common = ["--data", str(inputs["data"]), "--model", str(inputs["model"])]
    # a flag given twice takes its last value, so ``extra`` overrides ``common``
    result = invoke(*common, "--out", str(tmp_path / "out"), *extra, "--device", "cpu")
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_required_flags_exit_2(tmp_path):
    result = invoke("--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "error: data.path is not set" in result.output


def test_docs_table_and_help_are_generated_from_the_config():
    """docs/training.md's configuration table is config_reference() (regenerate it with the
    command in the comment above it), and every flag of --help is a TrainConfig key's."""
    from pathlib import Path

    from drift_engine.cli.train import _FLAGS
    from drift_engine.train.config import config_reference, leaf_fields

    doc = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    start = doc.index("| key | flag | default | meaning |")
    end = doc.index("<!-- end of the generated table -->")
    assert doc[start:end] == config_reference()
    help_text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    keys = dict(leaf_fields())
    for name, (key, option) in _FLAGS.items():
        assert keys[key].metadata["help"] in " ".join(help_text.split()), name
        assert f"| `{key}` | `{'/'.join(option.opts + option.secondary_opts)}` |" in doc
    assert {"lr", "max_steps", "gamma", "beta", "resume", "progress"} <= _FLAGS.keys()
