"""The ``drift-engine`` command line: a thin layer over the package's typed configs.

Each subcommand lives in its own module and is registered lazily, so ``--help`` is fast
and a missing optional dependency only affects the command that needs it. User errors
(``DriftError``, and click's own usage errors: a missing option, a bad value, an unknown
flag) print one ``error:`` line and exit with code 2; no traceback, no usage dump. Every
``--help`` shows defaults the same way, ``[default: ...]``.
"""

from __future__ import annotations

import importlib.util
import sys

import click

from drift_engine.errors import DriftError

# click >= 8.2 raises it for a group called without a subcommand
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", None)

# command name -> "module:attribute" of its click.Command
_COMMANDS = {
    "rollout": "drift_engine.cli.rollout:rollout",
    "train": "drift_engine.cli.train:train",
    "eval": "drift_engine.cli.eval:eval_command",
    "convert": "drift_engine.cli.convert:convert",
    "demo": "drift_engine.cli.demo:demo",
    "recipe": "drift_engine.cli.recipe:recipe",
    "native": "drift_engine.cli.native:native",
}

_SHORT_HELP = {
    "rollout": "Sample multi-turn trajectories from a reference model into rollouts.safetensors.",
    "train": "Importance-weighted SFT on a rollouts file (packed, fused loss).",
    "eval": "multi@k evaluation: greedy multi-turn decoding with feedback.",
    "convert": "Import the DRIFT reference's rollout JSONL into rollouts.safetensors.",
    "demo": "End-to-end DRIFT on the embedded toy environment and tiny model (CPU).",
    "recipe": "DRIFT vs rejection sampling vs SFT on a real model (SmolLM2-135M), one CPU.",
    "native": "Build (or report on) the native CPU cross-entropy for this machine.",
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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            if _NO_ARGS_IS_HELP is not None and isinstance(err, _NO_ARGS_IS_HELP):
                err.show()  # `drift-engine` alone: the help, as click prints it
                sys.exit(err.exit_code)
            click.echo(f"error: {usage_error_line(err)}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_error_line(err: click.ClickException) -> str:
    """Click's message on one line, with where to read the command's options."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        message += f" (see: {ctx.command_path} --help)"
    return message


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(package_name="drift-engine")
def cli() -> None:
    """drift-engine: DRIFT (offline multi-turn rollouts + importance-weighted SFT), fast and exact."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="drift-engine")
