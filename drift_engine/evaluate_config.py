"""EvalConfig: the settings of a multi@k evaluation, one documented, checked field each.

They are ``drift-engine eval``'s flags (generated from these fields: their flag, type,
choices, default and help) and the keys of its ``--config`` TOML file, e.g.::

    models = ["ref/", "runs/drift/checkpoint-000120"]
    labels = ["reference", "drift"]
    problems = ["heldout.jsonl"]
    env = "math"
    max_turns = 5
    out = "eval/"

``drift_engine.evaluate.run_eval(config)`` runs it. The environment's and the engine's
settings are rollout's too (``drift_engine.rollout_config.EnvEngineConfig``). Reading a
configuration imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from drift_engine.errors import ConfigError
from drift_engine.fields import HELP, at_least, check_fields, load_config, option
from drift_engine.rollout_config import EnvEngineConfig

# Fields that a run cannot do without: their flag is reported missing, as click reports a
# required option.
REQUIRED = ("models", "problems", "out", "env")


@dataclass
class EvalConfig(EnvEngineConfig):
    """A multi@k evaluation: the models, the benchmarks and the shared settings of the
    environment and the engine (``EnvEngineConfig``)."""

    models: list[str] = option(
        default_factory=list,
        help="Model folder or id (repeatable: compared). Required.",
        flag="--model",
        multiple=True,
    )
    problems: list[str] = option(
        default_factory=list,
        help="Benchmark: JSONL file or hf:NAME (repeatable). Required.",
        flag="--problems",
        multiple=True,
    )
    labels: list[str] = option(
        default_factory=list,
        help="Name of the model in tables and plots, one per --model in the same order.",
        flag="--label",
        multiple=True,
        show_default="the model folder's name",
    )
    max_turns: int = option(
        5, help="Turns per problem: multi@k for k = 1..MAX_TURNS.", flag="--max-turns",
        check=at_least(1),
    )  # fmt: skip
    out: str = option("", help="Output folder. Required.", flag="--out", metavar="PATH")
    overwrite: bool = option(
        False, help="Write into an --out folder that already holds files.", flag="--overwrite"
    )
    progress: bool = option(
        True, help="Progress bar of each model's episodes.", flag="--progress/--no-progress"
    )

    def missing(self) -> list[str]:
        """The required fields that are not set, in order."""
        return [name for name in REQUIRED if not getattr(self, name)]

    def validate(self) -> EvalConfig:
        """Raise ConfigError on the first problem: a required key unset, then each field's
        own check."""
        for name in self.missing():
            field = EvalConfig.__dataclass_fields__[name]
            raise ConfigError(f"{name} is not set: {field.metadata[HELP]}")
        check_fields(self)
        return self


def load_eval_config(path: str | Path) -> EvalConfig:
    """Read an eval TOML file (not yet validated: flags may follow)."""
    return load_config(path, EvalConfig)
