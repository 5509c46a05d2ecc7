"""Environments: the interface, the built-in environments and the registry.

``load_environment("math")`` builds a built-in environment; ``load_environment(
"my_pkg.my_module:MyEnv", **config)`` builds a user's (any ``Environment`` subclass, or a
callable returning an ``Environment``). Built-ins are imported lazily.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from drift_engine.envs.base import (
    DEFAULT_FEEDBACK,
    Environment,
    Message,
    Problem,
    StepResult,
    score_answer,
)
from drift_engine.envs.problems import load_problems, parse_field_mapping
from drift_engine.errors import DriftError, EnvironmentSpecError

BUILTIN_ENVIRONMENTS: dict[str, str] = {
    "math": "drift_engine.envs.math:MathEnv",
    "choice": "drift_engine.envs.choice:ChoiceEnv",
    "guess": "drift_engine.envs.guess:GuessNumberEnv",
}

__all__ = [
    "BUILTIN_ENVIRONMENTS",
    "DEFAULT_FEEDBACK",
    "Environment",
    "Message",
    "Problem",
    "StepResult",
    "environment_spec",
    "load_environment",
    "load_problems",
    "parse_field_mapping",
    "score_answer",
]


def _resolve(spec: str) -> Any:
    target = BUILTIN_ENVIRONMENTS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise EnvironmentSpecError(
            f"unknown environment {spec!r}: use a built-in name "
            f"({', '.join(BUILTIN_ENVIRONMENTS)}) or an import path 'package.module:Class'."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise EnvironmentSpecError(
            f"cannot import the environment module {module_name!r} ({err}); check the import "
            "path and that the package is installed or on PYTHONPATH."
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EnvironmentSpecError(
            f"module {module_name!r} has no attribute {attr!r}; check the environment's "
            "import path 'package.module:Class'."
        ) from None


def load_environment(spec: str, **config: Any) -> Environment:
    """Build the environment named by ``spec`` (built-in name or ``package.module:Class``)
    with keyword ``config`` passed to its constructor."""
    factory = _resolve(spec)
    if not callable(factory):
        raise EnvironmentSpecError(f"{spec!r} is not a class or factory of an Environment.")
    try:
        signature = inspect.signature(factory)
        signature.bind(**config)
    except TypeError as err:
        accepted = ", ".join(
            p.name for p in signature.parameters.values() if p.kind is not p.VAR_POSITIONAL
        )
        raise EnvironmentSpecError(
            f"bad configuration for environment {spec!r}: {err}. It accepts: "
            f"{accepted or 'no options'}."
        ) from None
    except ValueError:  # no signature available (builtins): let the call decide
        pass
    try:
        env = factory(**config)
    except DriftError:
        raise
    except (TypeError, ValueError, OverflowError) as err:  # e.g. int() of a bad option value
        raise EnvironmentSpecError(f"bad configuration for environment {spec!r}: {err}") from None
    if not isinstance(env, Environment):
        raise EnvironmentSpecError(
            f"{spec!r} produced a {type(env).__name__}, not a drift_engine.envs.Environment; "
            "subclass Environment and implement initial_messages and step."
        )
    return env


def environment_spec(env: Environment) -> str:
    """The spec that rebuilds ``env``: its built-in name, or its import path."""
    cls = type(env)
    path = f"{cls.__module__}:{cls.__qualname__}"
    for name, target in BUILTIN_ENVIRONMENTS.items():
        if target == path:
            return name
    return path
