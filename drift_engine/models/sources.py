"""What a ``--model`` value names, resolved once for every command (rollout, train, eval,
convert's tokenizer): a Hub id or Hugging Face folder as it is, a training checkpoint folder
as the model export inside it, a GGUF file (or a folder whose one model file is a GGUF) as
its converted Hugging Face folder (:mod:`drift_engine.models.gguf`)."""

from __future__ import annotations

import os
from pathlib import Path

from drift_engine.models.gguf import cached_conversion, find_gguf_file

CHECKPOINT_MODEL_DIR = "model"  # the Hugging Face export inside checkpoint-N/


def resolve_model_source(name_or_path: str | os.PathLike) -> str:
    """The Hub id or local Hugging Face folder to load for ``name_or_path``."""
    path = Path(name_or_path)
    export = path / CHECKPOINT_MODEL_DIR
    if path.is_dir() and not (path / "config.json").exists() and (export / "config.json").exists():
        return str(export)
    gguf = find_gguf_file(path)
    if gguf is not None:
        return str(cached_conversion(gguf))
    return str(name_or_path)


__all__ = ["CHECKPOINT_MODEL_DIR", "resolve_model_source"]
