"""Importance-weighted SFT: typed configuration, the training loop, checkpoints.

``TrainConfig`` (``config.py``) is the single source of truth; ``train(config)`` runs it.
The loop is imported lazily so that reading a configuration does not load the models.
"""

from drift_engine.train.config import (
    CheckpointConfig,
    DataConfig,
    LoraSection,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    WeightingSection,
    apply_overrides,
    config_from_dict,
    load_config,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LoraSection",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "WeightingSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "Trainer",
    "TrainResult",
    "train",
]


def __getattr__(name: str):
    if name in ("Trainer", "TrainResult", "train"):
        from drift_engine.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'drift_engine.train' has no attribute {name!r}")
