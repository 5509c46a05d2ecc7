"""The ``drift-engine`` command line: a thin layer over the package's typed configs.

Each subcommand lives in its own module and is registered lazily, so ``--help`` is fast
and a missing optional dependency only affects the command that needs it. User errors
(``DriftError``) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import importlib.util
import sys

import click

from drift_engine.errors import DriftError

# command name -> "module:attribute" of its click.Command
_COMMANDS = {
    "rollout": "drift_engine.cli.rollout:rollout",
    "train": "drift_engine.cli.train:train",
    "eval": "drift_engine.cli.eval:eval_command",
    "convert": "drift_engine.cli.convert:convert",
    "demo": "drift_engine.cli.demo:demo",
}

_SHORT_HELP = {
    "rollout": "Sample multi-turn trajectories from a reference model into rollouts.safetensors.",
    "train": "Importance-weighted SFT on a rollouts file (packed, fused loss).",
    "eval": "multi@k evaluation: greedy multi-turn decoding with feedback.",
    "convert": "Import the DRIFT reference's rollout JSONL into rollouts.safetensors.",
    "demo": "End-to-end DRIFT on the embedded toy environment and tiny model (CPU).",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in _COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = _COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None or not self._available(name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SHORT_HELP[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DriftError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="drift-engine")
def cli() -> None:
    """drift-engine: DRIFT (offline multi-turn rollouts + importance-weighted SFT), fast and exact."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="drift-engine")
