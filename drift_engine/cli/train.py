"""``drift-engine train``: importance-weighted SFT on a rollouts file.

A thin layer over ``drift_engine.train.config``: defaults, then ``--config FILE`` (TOML),
then ``--set KEY=VALUE`` (any key of the file), then the flags given on the command line,
then validation of the whole configuration. The flags are generated from TrainConfig's
fields (their flag, type, choices, default and help), so ``--help`` is the configuration's
own documentation.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from drift_engine.cli.options import (
    config_and_set_options,
    config_of_command_line,
    flag_options,
    given_flags,
    with_flags,
)
from drift_engine.train.config import TrainConfig

_FLAGS = flag_options(TrainConfig)


@with_flags(_FLAGS)
@click.command("train")
@config_and_set_options("optim.betas=[0.9,0.95]")
def train(config_file: str | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Importance-weighted SFT on a rollouts file (packed, fused loss).

    \b
    drift-engine train --data rollouts.safetensors --model Qwen/Qwen2.5-3B-Instruct --out runs/drift
    drift-engine train --config train.toml --lr 1e-5 --resume
    drift-engine train --config train.toml --set schedule.min_lr_ratio=0.1
    """
    import torch.distributed as dist

    from drift_engine.train.loop import Trainer

    config = config_of_command_line(TrainConfig, _FLAGS, config_file, given_flags(flags), settings)
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
    if trainer.ctx.is_main and result.nothing_trained is not None:
        click.echo(f"nothing trained: {result.nothing_trained}")  # exit 0: the run is complete
    elif trainer.ctx.is_main:
        click.echo(
            f"trained {result.steps} steps; checkpoint: {result.checkpoint}; model: {result.model}"
        )
