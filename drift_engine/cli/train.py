"""``drift-engine train``: importance-weighted SFT on a rollouts file.

A thin layer over ``drift_engine.train.config``: defaults, then ``--config FILE`` (TOML),
then the flags given on the command line, then validation of the whole configuration.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from drift_engine.train.config import TrainConfig, apply_overrides, load_config

# flag name -> dotted TrainConfig key
_FLAG_KEYS = {
    "data": "data.path",
    "model": "model.name_or_path",
    "out": "out",
    "max_steps": "data.max_steps",
    "epochs": "data.epochs",
    "batch_tokens": "data.batch_tokens",
    "grad_accum": "data.grad_accum",
    "train_turns": "data.train_turns",
    "loss_mode": "data.loss_mode",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip",
    "schedule": "schedule.name",
    "warmup_ratio": "schedule.warmup_ratio",
    "gamma": "weighting.gamma",
    "beta": "weighting.beta",
    "seed": "seed",
    "resume": "checkpoint.resume",
    "allow_config_change": "checkpoint.allow_config_change",
    "merge_lora": "checkpoint.merge_lora",
    "check_tokenizer": "data.check_tokenizer",
    "max_nonfinite_steps": "optim.max_nonfinite_steps",
    "save_every": "checkpoint.every_steps",
    "keep_last": "checkpoint.keep_last",
    "dtype": "model.dtype",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "compile": "model.compile",
    "lora_r": "model.lora.r",
    "device": "device",
    "strategy": "strategy",
}


def build_config(config_file: str | None, flags: dict[str, Any]) -> TrainConfig:
    """The validated TrainConfig for a command line: TOML file first, then the flags."""
    config = load_config(config_file) if config_file else TrainConfig()
    config = apply_overrides(config, {_FLAG_KEYS[name]: value for name, value in flags.items()})
    return config.validate()


@click.command("train")
@click.option("--data", type=click.Path(), help="rollouts.safetensors (file, shard or folder).")
@click.option("--model", help="Model to train: a local folder or a Hugging Face id.")
@click.option("--out", type=click.Path(), help="Output folder (checkpoints, metrics.jsonl).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="TOML configuration; the flags below override its keys.",
)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--epochs", type=int, help="Passes over the rollouts (default 1).")
@click.option(
    "--batch-tokens", type=int, help="Token budget of one packed micro-batch (default 16384)."
)
@click.option(
    "--grad-accum", type=int, help="Micro-batches per optimizer step and rank (default 1)."
)
@click.option("--lr", type=float, help="Peak learning rate (default 5e-6).")
@click.option("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1).")
@click.option(
    "--grad-clip", type=float, help="Clip the gradient norm to this (0: off; default 1.0)."
)
@click.option(
    "--schedule",
    type=click.Choice(["constant_with_warmup", "cosine"]),
    help="Learning-rate schedule (default constant_with_warmup).",
)
@click.option("--warmup-ratio", type=float, help="Warmup fraction of the steps (default 0.1).")
@click.option("--gamma", type=float, help="Turn discount; recomputes the weights from rewards.")
@click.option("--beta", type=float, help="Weight temperature; recomputes the weights from rewards.")
@click.option(
    "--train-turns",
    type=click.Choice(["last", "all"]),
    help="Train the last assistant turn (default) or all of them.",
)
@click.option(
    "--loss-mode",
    type=click.Choice(["trajectory", "weighted", "token"]),
    help="Step loss: mean over trajectories (default), Σw·ℓ/Σw, or token mean.",
)
@click.option("--seed", type=int, help="Seed of data order and initialisation (default 0).")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    help="Resume from the newest checkpoint in --out, or from the checkpoint folder given.",
)
@click.option(
    "--allow-config-change",
    is_flag=True,
    default=None,
    help="Resume although data, model, weighting, optimizer or schedule settings differ from "
    "the checkpoint's (recorded in run.json).",
)
@click.option("--save-every", type=int, help="Checkpoint every N optimizer steps (0: at the end).")
@click.option("--keep-last", type=int, help="Checkpoints to keep (default 2).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU; weights stay float32).",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute activations in backward to save memory.",
)
@click.option(
    "--compile/--no-compile",
    default=None,
    help="torch.compile each decoder layer: faster steps after a one-time compile.",
)
@click.option("--lora-r", type=int, help="Train LoRA adapters of this rank (needs peft).")
@click.option(
    "--merge-lora",
    is_flag=True,
    default=None,
    help="LoRA runs: export the merged model in checkpoint-N/model instead of the adapter.",
)
@click.option(
    "--check-tokenizer/--no-check-tokenizer",
    default=None,
    help="Compare the rollouts' recorded tokenizer with the model's (default on; skipping is "
    "recorded in run.json).",
)
@click.option(
    "--max-nonfinite-steps",
    type=int,
    help="Non-finite steps (loss or grad norm; skipped) in a row that stop the run (default 3).",
)
@click.option("--device", help="Device (default: CUDA when available, else CPU).")
@click.option(
    "--strategy",
    type=click.Choice(["auto", "none", "ddp", "fsdp"]),
    help="Multi-process strategy under torchrun (default auto).",
)
def train(config_file: str | None, **flags: Any) -> None:
    """Importance-weighted SFT on a rollouts file (packed, fused loss).

    \b
    drift-engine train --data rollouts.safetensors --model Qwen/Qwen2.5-3B-Instruct --out runs/drift
    drift-engine train --config train.toml --lr 1e-5 --resume
    """
    import torch.distributed as dist

    from drift_engine.train.loop import Trainer

    config = build_config(config_file, flags)
    argv = sys.argv[sys.argv.index("train") + 1 :] if "train" in sys.argv else None
    command = shlex.join(["drift-engine", "train", *argv]) if argv is not None else None
    try:
        trainer = Trainer(config, command=command)
        result = trainer.fit()
    finally:
        # Tear the torchrun process group down however training ended (also when the
        # trainer failed after joining it).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.ctx.is_main:
        click.echo(
            f"trained {result.steps} steps; checkpoint: {result.checkpoint}; model: {result.model}"
        )
