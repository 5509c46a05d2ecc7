"""``drift-engine demo``: DRIFT end to end on the embedded toy task, on a CPU, in minutes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from drift_engine.cli.options import weighting_options
from drift_engine.demo import (
    DemoConfig,
    ToyModelConfig,
    build_toy_model,
    check_demo_out,
    run_demo,
)
from drift_engine.errors import ConfigError

_DEFAULTS = DemoConfig()


def _config_option(flag: str, kind: Any, help_text: str) -> Callable[[Any], Any]:
    """``flag`` with DemoConfig's default of the field it names (``--train-turns``:
    ``train_turns``), shown in --help."""
    default = getattr(_DEFAULTS, flag.removeprefix("--").replace("-", "_"))
    return click.option(flag, type=kind, default=default, show_default=True, help=help_text)


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="demo-out",
    show_default=True,
    help="Output folder: results.json, results.md, multi_at_k.png, rollouts, checkpoints.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="the tiny model shipped in the package",
    help="Toy reference model folder.",
)
@click.option(
    "--rebuild-model",
    is_flag=True,
    help="Pretrain the toy reference model from scratch into OUT/guess-model first "
    "(seeded; several minutes on 2 CPU cores) and use it.",
)
@_config_option("--samples-per-prompt", click.IntRange(min=1), "Rollouts per training secret.")
@_config_option(
    "--steps",
    click.IntRange(min=1),
    "Optimizer steps of DRIFT and of the rejection-sampling baseline each.",
)
@_config_option(
    "--train-turns",
    click.Choice(["last", "all"]),
    "Assistant turns trained: the last of each trajectory (DRIFT default) or all.",
)
@weighting_options()
@_config_option("--seed", int, "Seed of sampling and training.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    show_default="torch's choice",
    help="torch CPU threads. On a machine shared with other jobs, 1 is often fastest for "
    "this tiny model.",
)
@click.option(
    "--progress/--no-progress",
    default=False,
    show_default=True,
    help="Progress bars for rollouts and training.",
)
def demo(
    out: str,
    model_dir: str | None,
    rebuild_model: bool,
    samples_per_prompt: int,
    steps: int,
    train_turns: str,
    gamma: float,
    beta: float,
    seed: int,
    threads: int | None,
    progress: bool,
) -> None:
    """End-to-end DRIFT on guess-a-number with a tiny model, on a CPU, no download.

    The reference policy (a 0.09M-parameter Llama pretrained on games of mixed habits:
    bisecting, stepping by one, repeating itself, guessing at random) samples multi-turn
    rollouts on the training secrets; their returns become DRIFT importance weights;
    weighted SFT trains the DRIFT policy, and unweighted SFT on the solved rollouts the
    rejection-sampling baseline. All three are evaluated greedily (multi@1..K) on held-out
    secrets. Every number is measured by this run.
    """
    started = time.perf_counter()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # model load/save bars would drown the report
    if rebuild_model and model_dir is not None:
        raise ConfigError("give --model or --rebuild-model, not both.")
    out_dir = Path(out)
    config = DemoConfig(  # checks the options before minutes of work
        model_dir=model_dir or "",
        samples_per_prompt=samples_per_prompt,
        steps=steps,
        train_turns=train_turns,
        gamma=gamma,
        beta=beta,
        seed=seed,
    )
    check_demo_out(out_dir)
    if rebuild_model:
        built = build_toy_model(out_dir / "guess-model", ToyModelConfig(), log=click.echo)
        config = dataclasses.replace(config, model_dir=str(built))
    result = run_demo(out_dir, config, log=click.echo, progress=progress)

    from drift_engine.evaluate import format_table

    click.echo("")
    click.echo(format_table(result.results))
    reference, drift, rejection = (r.multi_at_k[-1] for r in result.results)
    k = result.results[0].max_turns
    click.echo(
        f"\nmulti@{k}: DRIFT {100 * drift:.1f} vs reference {100 * reference:.1f} "
        f"({100 * (drift - reference):+.1f} points), vs rejection sampling "
        f"{100 * rejection:.1f} ({100 * (drift - rejection):+.1f} points)"
    )
    click.echo(f"results: {result.files['results']}, plot: {result.files['plot']}")
    click.echo(f"wall time: {time.perf_counter() - started:.0f} s")
