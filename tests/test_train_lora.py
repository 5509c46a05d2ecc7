"""The trainer's LoRA path end to end: only the adapters train, the checkpoint is a peft
adapter that reproduces the trained model, and a LoRA run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from factories import VOCAB, base_config, make_model_dir, make_rollouts, run
from safetensors.torch import load_file

from drift_engine.cli import cli
from drift_engine.data.rollouts import save_rollouts

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    model = make_model_dir(root / "qwen2", "qwen2")
    data = root / "rollouts.safetensors"
    save_rollouts(data, make_rollouts(tokenizer=AutoTokenizer.from_pretrained(model)))
    return {"root": root, "models": {"qwen2": model}, "data": data}


def base_name(peft_name: str) -> str:
    """The base model's parameter name for a peft-wrapped one."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_lora_trains_adapters_only_and_exports_a_peft_adapter(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from drift_engine.train.loop import Trainer

    model_dir = workspace["models"]["qwen2"]
    config = base_config(
        workspace,
        tmp_path / "out",
        **{
            "model.lora.r": 4,
            "data.grad_accum": 64,  # one step per epoch over every trajectory
            "data.epochs": 3,
            "optim.lr": 1e-2,
        },
    )
    trainer = Trainer(config)
    result = trainer.fit()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]  # the same data each step

    model = trainer.model
    initial = load_file(model_dir / "model.safetensors")
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    # peft starts every lora_B at zero; training moved all of them
    assert all(p.abs().max() > 0 for n, p in adapters.items() if "lora_B" in n)
    base = {base_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
    assert base.keys() == initial.keys()
    for name, tensor in initial.items():
        assert not base[name].requires_grad
        assert torch.equal(base[name], tensor), name

    # The checkpoint's export is a peft adapter (no full model) that loads onto the base
    # model and reproduces the trained model.
    checkpoint = result.checkpoint
    assert result.model == checkpoint / "model"
    assert (result.model / "adapter_config.json").is_file()
    assert not (result.model / "model.safetensors").exists()
    saved = load_file(result.model / "adapter_model.safetensors")
    assert len(saved) == len(adapters)
    # The resume state holds the adapters, not the frozen base model.
    reader = dcp.FileSystemReader(checkpoint / "trainer" / "dcp")
    stored = [k for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert sorted(stored) == sorted(f"model.{n}" for n in adapters)
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager"), result.model
    )
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # (2, 24, V)
        got = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            untrained = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (untrained - expected).abs().max() > 1e-2  # the adapter does change the outputs


def test_lora_merged_export(workspace, tmp_path):
    """--merge-lora: checkpoint-N/model is the full model with the adapters folded in."""
    from transformers import AutoModelForCausalLM

    from drift_engine.train.loop import Trainer

    model_dir = workspace["models"]["qwen2"]
    config = base_config(
        workspace,
        tmp_path / "out",
        **{"model.lora.r": 4, "data.max_steps": 2, "optim.lr": 1e-2, "checkpoint.merge_lora": True},
    )
    trainer = Trainer(config)
    result = trainer.fit()
    assert not (result.model / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.model, attn_implementation="eager")
    assert merged.state_dict().keys() == load_file(model_dir / "model.safetensors").keys()
    assert "merged model" in (result.model / "README.md").read_text()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits  # (2, 24, V)
        got = merged(input_ids=ids).logits
        with trainer.model.disable_adapter():
            untrained = trainer.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (untrained - expected).abs().max() > 1e-3  # the adapters were merged in
    # the live model was not merged in place: its base weights are the initial ones
    initial = load_file(model_dir / "model.safetensors")
    base = {base_name(n): p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    for name, tensor in initial.items():
        assert torch.equal(base[name], tensor), name


def test_lora_resume_reproduces_uninterrupted_run(workspace, tmp_path):
    overrides = {
        "model.lora.r": 4,
        "model.lora.dropout": 0.1,  # the RNG state matters across the resume
        "data.batch_tokens": 64,
        "data.grad_accum": 2,
        "data.epochs": 2,
        "data.max_steps": 4,
        "checkpoint.every_steps": 2,
        "optim.lr": 1e-2,
    }
    # The uninterrupted run goes through the command line: --lora-r on top of [model.lora].
    toml = tmp_path / "train.toml"
    toml.write_text(
        "[data]\nbatch_tokens = 64\ngrad_accum = 2\nepochs = 2\n"
        "[model]\ndtype = 'float32'\n[model.lora]\nr = 2\ndropout = 0.1\n"
        "[optim]\nlr = 1e-2\n[schedule]\nwarmup_ratio = 0.0\n"
    )
    straight_dir = tmp_path / "straight"
    args = [
        "train", "--config", str(toml), "--data", str(workspace["data"]),
        "--model", str(workspace["models"]["qwen2"]), "--out", str(straight_dir),
        "--lora-r", "4", "--max-steps", "4", "--save-every", "2", "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    straight = [json.loads(x) for x in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in straight] == [1, 2, 3, 4]

    resumed_dir = tmp_path / "resumed"
    run(base_config(workspace, resumed_dir, **overrides), stop_at=3)
    assert not (resumed_dir / "checkpoint-000003").exists()
    resumed = run(
        base_config(workspace, resumed_dir, **overrides, **{"checkpoint.resume": "latest"})
    )
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed, strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens", "epoch"):
            assert a[key] == b[key], key
    final_a = load_file(straight_dir / "checkpoint-000004" / "model" / "adapter_model.safetensors")
    final_b = load_file(resumed_dir / "checkpoint-000004" / "model" / "adapter_model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name, tensor in final_a.items():
        assert torch.equal(final_b[name], tensor), name
