"""Where a Hugging Face causal LM keeps its repeated blocks: the units FSDP2 shards and
regional compilation compiles."""

from __future__ import annotations

from torch import nn

from drift_engine.errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``, each one FSDP2 unit.

    Hugging Face models name their block classes in ``_no_split_modules`` (e.g.
    ``Qwen2DecoderLayer``); otherwise the blocks of the largest ``nn.ModuleList`` are used.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(
            f"cannot find the decoder layers of {type(model).__name__} to shard: it names no "
            "_no_split_modules and holds no nn.ModuleList; use strategy 'ddp'"
        )
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


__all__ = ["decoder_layers"]
