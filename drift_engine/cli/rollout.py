"""``drift-engine rollout``: sample multi-turn trajectories into rollouts.safetensors.

A thin layer over ``drift_engine.rollout.run``: defaults, then ``--config FILE`` (TOML, the
keys of ``RolloutConfig``), then ``--set KEY=VALUE``, then the flags given on the command
line (generated from RolloutConfig's fields) and the shard files given as arguments, then
``run_rollout``. Sharded runs, their merge under torchrun and ``--merge SHARD... --out
FILE`` are described in ``drift_engine.rollout.run``.
"""

from __future__ import annotations

from typing import Any

import click

from drift_engine.cli.options import (
    config_and_set_options,
    config_of_command_line,
    flag_options,
    given_flags,
    with_flags,
)
from drift_engine.rollout_config import RolloutConfig

_FLAGS = flag_options(RolloutConfig)


@with_flags(_FLAGS)
@click.command("rollout")
@click.argument("shards", nargs=-1, type=click.Path())
@config_and_set_options("n=4")
def rollout(
    shards: tuple[str, ...], config_file: str | None, settings: tuple[str, ...], **flags: Any
) -> None:
    """Sample N trajectories per problem, up to MAX_TURNS turns each, from a reference model.

    With --merge: merge the SHARDS written by a sharded run (e.g. one process per GPU
    started with --shard-rank/--shard-world) into --out.

    \b
    drift-engine rollout --model ref/ --env math --problems train.jsonl --out r.safetensors
    drift-engine rollout --config rollout.toml --set temperature=0.8
    """
    arguments = {"shards": list(shards)} if shards else None
    config = config_of_command_line(
        RolloutConfig, _FLAGS, config_file, given_flags(flags), settings, arguments
    )
    from drift_engine.rollout.run import run_rollout

    run_rollout(config, echo=click.echo, log=lambda line: click.echo(line, err=True))
