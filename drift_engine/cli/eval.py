"""``drift-engine eval``: multi@k of one or more models on one or more benchmarks.

A thin layer over ``drift_engine.evaluate``: defaults, then ``--config FILE`` (TOML, the
keys of ``EvalConfig``), then ``--set KEY=VALUE``, then the flags given on the command line
(generated from EvalConfig's fields; a repeatable flag given replaces the file's list), then
``run_eval``. Writes ``<out>/<benchmark>.json`` (every model's multi@1..K and per-problem
first correct turn), ``<out>/<benchmark>.md`` (the table) and ``<out>/<benchmark>.png``
(multi@k vs k). An ``--out`` folder that already holds files is refused unless
``--overwrite`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drift_engine.cli.options import (
    config_and_set_options,
    config_of_command_line,
    flag_options,
    given_flags,
    with_flags,
)
from drift_engine.evaluate_config import EvalConfig

_FLAGS = flag_options(EvalConfig)


@with_flags(_FLAGS)
@click.command("eval")
@config_and_set_options("max_turns=3")
def eval_command(config_file: str | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Greedy multi-turn evaluation with feedback: multi@k for k = 1..MAX_TURNS.

    \b
    drift-engine eval --model ref/ --model runs/drift/model --problems heldout.jsonl \\
        --env math --out eval/
    drift-engine eval --config eval.toml --overwrite
    """
    from drift_engine.evaluate import format_table, run_eval

    config = config_of_command_line(EvalConfig, _FLAGS, config_file, given_flags(flags), settings)
    results = run_eval(config)
    for name, rows in results.items():
        click.echo(f"\n{name} ({rows[0].num_problems} problems)\n{format_table(rows)}")
    click.echo(f"\nresults in {Path(config.out)}")
