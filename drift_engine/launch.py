"""torchrun's environment, read in one place (rollout sharding, vLLM's core binding and the
trainer's process group all start from it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from drift_engine.errors import ConfigError


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int  # RANK (0 outside torchrun)
    world_size: int  # WORLD_SIZE (1 outside torchrun)
    local_rank: int | None  # LOCAL_RANK: this process's index on its node; None outside
    local_world_size: int | None  # LOCAL_WORLD_SIZE: processes on this node; None outside


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
            "which sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE"
        ) from None


def torchrun_env() -> TorchrunEnv:
    """This process's place in a torchrun job; rank 0 of 1 outside torchrun."""
    return TorchrunEnv(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", None),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", None),
    )


__all__ = ["TorchrunEnv", "torchrun_env"]
