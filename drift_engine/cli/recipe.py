"""``drift-engine recipe``: DRIFT against its baselines on a real pretrained model, on a CPU.

The flags are generated from ``RecipeConfig``'s fields (their flag, type, choices, default
and help); ``--config FILE`` (TOML, the same keys) and ``--set KEY=VALUE`` come first, the
flags given override them.
"""

from __future__ import annotations

import time
from typing import Any

import click

from drift_engine.cli.options import (
    config_and_set_options,
    config_of_command_line,
    flag_options,
    given_flags,
    with_flags,
)
from drift_engine.recipe import RecipeConfig, run_recipe

_FLAGS = flag_options(RecipeConfig)


@with_flags(_FLAGS)
@click.command("recipe")
@click.option("--out", type=click.Path(file_okay=False), default="recipe-out", show_default=True,
              help="Output folder. A rerun with the same settings continues an interrupted "
              "run; other settings in the same folder are refused.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None,
              show_default="torch's choice", help="torch CPU threads.")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bars (with ETAs) of rollouts and training; without them, "
              "training logs a line every 30 s.")  # fmt: skip
@config_and_set_options("steps=24")
def recipe(out: str, threads: int | None, progress: bool, config_file: str | None,
           settings: tuple[str, ...], **flags: Any) -> None:  # fmt: skip
    """DRIFT vs rejection sampling vs plain SFT on arithmetic word problems.

    The reference model samples multi-turn rollouts on training problems; DRIFT (importance
    weights from the returns), rejection sampling (solved rollouts) and plain SFT (all
    rollouts) are trained on them for each seed; every model is evaluated greedily
    (multi@1..K) on held-out problems. Writes results.json, results.md, multi_at_k.png and
    transcripts.md into OUT. The defaults fit about an hour on 2 CPU cores (docs/recipe.md).
    """
    started = time.perf_counter()
    config = config_of_command_line(RecipeConfig, _FLAGS, config_file, given_flags(flags), settings)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = run_recipe(out, config, log=click.echo, progress=progress)
    click.echo("")
    click.echo(open(result.files["table"], encoding="utf-8").read().rstrip())
    click.echo(
        f"\nresults: {result.files['results']}, plot: {result.files['plot']}, "
        f"transcripts: {result.files['transcripts']}"
    )
    click.echo(f"wall time of this invocation: {time.perf_counter() - started:.0f} s")
