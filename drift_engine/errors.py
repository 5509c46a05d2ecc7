"""Errors that mean "the user gave us something wrong", as opposed to bugs.

The CLI turns any ``DriftError`` into a one-line message and exit code 2, without a traceback.
Each message says what is wrong and how to fix it.
"""


class DriftError(ValueError):
    """Base class of user-facing errors (bad input, bad configuration)."""


class RolloutFormatError(DriftError):
    """A rollouts.safetensors file is missing tensors, mistyped or inconsistent."""


class ConfigError(DriftError):
    """A configuration value or combination of values is invalid."""


class EnvironmentSpecError(DriftError):
    """An environment or problem file cannot be loaded or is malformed."""


class CheckpointError(DriftError):
    """A training checkpoint is incomplete, corrupt, unsafe to load, or does not match the run."""


class TrainingDivergedError(DriftError):
    """Training produced non-finite losses, gradients or parameters and was stopped."""
