"""Learning-rate schedules: constant with linear warmup (the DRIFT default) and cosine.

Both are multipliers of the peak learning rate, as a function of the number of optimizer
steps already taken, wrapped in ``torch.optim.lr_scheduler.LambdaLR`` so the scheduler's
state (its step count) is saved and restored with the checkpoint.
"""

from __future__ import annotations

import math

import torch

from drift_engine.train.config import ScheduleConfig


def warmup_steps_for(config: ScheduleConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` when set, else
    ``ceil(warmup_ratio * total_steps)`` (as Hugging Face's Trainer rounds it)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * total_steps)


def lr_multiplier(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based).

    Warmup rises linearly as step / warmup, so the first step of a warmup runs at lr 0,
    exactly as Hugging Face's ``get_constant_schedule_with_warmup`` (used by the DRIFT
    reference) does.
    """
    warmup = warmup_steps_for(config, total_steps)
    if step < warmup:
        return step / warmup
    if config.name == "constant_with_warmup":
        return 1.0
    # cosine decay from the peak to min_lr_ratio over the steps after warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``optimizer`` following ``config`` for a run of ``total_steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(config, step, total_steps)
    )
