"""``drift-engine train``: importance-weighted SFT on a rollouts file.

A thin layer over ``drift_engine.train.config``: defaults, then ``--config FILE`` (TOML),
then ``--set KEY=VALUE`` (any key of the file), then the flags given on the command line,
then validation of the whole configuration. ``--help`` shows TrainConfig's defaults.
"""

from __future__ import annotations

import shlex
import sys
import tomllib
from typing import Any, get_args

import click
from click.core import ParameterSource

from drift_engine.errors import ConfigError
from drift_engine.train.config import DTypeName, TrainConfig, apply_overrides, load_config

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
    "report_to": "report_to",
    "progress": "progress",
}


def parse_set_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("optim.lr=1e-5", "optim.betas=[0.9, 0.95]")`` -> {dotted key: value}. A value is
    read as a TOML value (number, boolean, array, quoted string) when it is one, else kept
    as the string given (``--set data.path=r.safetensors``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set optim.lr=1e-5")
        try:
            overrides[key] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw
    return overrides


def build_config(
    config_file: str | None, flags: dict[str, Any], settings: tuple[str, ...] | list[str] = ()
) -> TrainConfig:
    """The validated TrainConfig for a command line: TOML file first, then the ``--set``
    settings, then the flags (those given: a None value means not given)."""
    config = load_config(config_file) if config_file else TrainConfig()
    set_keys = parse_set_options(settings)
    flag_keys = {_FLAG_KEYS[name]: value for name, value in flags.items() if value is not None}
    twice = sorted(set(set_keys) & set(flag_keys))
    if twice:
        flag = "--" + next(n for n, k in _FLAG_KEYS.items() if k == twice[0]).replace("_", "-")
        raise ConfigError(
            f"{twice[0]} is given twice: use {flag} or --set {twice[0]}=..., not both"
        )
    config = apply_overrides(config, set_keys)
    config = apply_overrides(config, flag_keys)
    return config.validate()


def _config_defaults(command: click.Command) -> click.Command:
    """Give each flag TrainConfig's default, so that --help shows it like every other command;
    ``train`` passes on only the flags given on the command line (the defaults must not
    override a --config file)."""
    defaults = TrainConfig()
    for param in command.params:
        if param.name not in _FLAG_KEYS:
            continue
        value = defaults
        for part in _FLAG_KEYS[param.name].split("."):
            value = getattr(value, part)
        if value is not None and value != "":
            param.default = value
    return command


@_config_defaults
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
@click.option("--epochs", type=int, help="Passes over the rollouts.")
@click.option("--batch-tokens", type=int, help="Token budget of one packed micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step and rank.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--weight-decay", type=float, help="AdamW weight decay on matrices.")
@click.option("--grad-clip", type=float, help="Clip the gradient norm to this (0: off).")
@click.option(
    "--schedule",
    type=click.Choice(["constant_with_warmup", "cosine"]),
    help="Learning-rate schedule.",
)
@click.option("--warmup-ratio", type=float, help="Warmup fraction of the steps.")
@click.option("--gamma", type=float, help="Turn discount; recomputes the weights from rewards.")
@click.option("--beta", type=float, help="Weight temperature; recomputes the weights from rewards.")
@click.option(
    "--train-turns",
    type=click.Choice(["last", "all"]),
    help="Train the last assistant turn of each trajectory, or all of them.",
)
@click.option(
    "--loss-mode",
    type=click.Choice(["trajectory", "weighted", "token"]),
    help="Step loss: mean over trajectories, Σw·ℓ/Σw, or token mean.",
)
@click.option("--seed", type=int, help="Seed of data order and initialisation.")
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
@click.option("--keep-last", type=int, help="Checkpoints to keep.")
@click.option(
    "--dtype",
    type=click.Choice(get_args(DTypeName)),
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
    help="Compare the rollouts' recorded tokenizer with the model's (skipping is recorded "
    "in run.json).",
)
@click.option(
    "--max-nonfinite-steps",
    type=int,
    help="Non-finite steps (loss or grad norm; skipped) in a row that stop the run.",
)
@click.option("--device", help="Device, e.g. cpu, cuda:1 (auto: CUDA when available, else CPU).")
@click.option(
    "--strategy",
    type=click.Choice(["auto", "none", "ddp", "fsdp"]),
    help="Multi-process strategy under torchrun.",
)
@click.option(
    "--report-to",
    callback=lambda ctx, param, value: (
        None if value is None else [n.strip() for n in value.split(",") if n.strip()]
    ),
    help="Also send metrics to these trackers, comma-separated: tensorboard, wandb, mlflow.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any key of the TOML configuration, e.g. --set optim.betas=[0.9,0.95] "
    "(repeatable; VALUE read as TOML when it can be).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on the main rank.",
)
def train(config_file: str | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Importance-weighted SFT on a rollouts file (packed, fused loss).

    \b
    drift-engine train --data rollouts.safetensors --model Qwen/Qwen2.5-3B-Instruct --out runs/drift
    drift-engine train --config train.toml --lr 1e-5 --resume
    drift-engine train --config train.toml --set schedule.min_lr_ratio=0.1
    """
    import torch.distributed as dist

    from drift_engine.train.loop import Trainer

    ctx = click.get_current_context()
    given = {
        name: value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    config = build_config(config_file, given, settings)
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
