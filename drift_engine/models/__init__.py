"""Hugging Face causal LMs for packed training with the fused weighted loss.

    model = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bf16", device="cuda")
    loss = weighted_sft_loss(model, packed_batch, normalizer)   # no logits materialised

Inside other trainers (docs/embedding.md): ``DriftTrainer`` and ``DriftDataCollator`` for a
Hugging Face ``Trainer`` (``DriftLossMixin`` for its subclasses, such as TRL's ``SFTTrainer``),
``apply_fused_loss`` to make ``model(input_ids, labels=...)`` compute the fused loss, and
``hf_trainer_loss`` for a padded batch.
"""

from typing import Any

from drift_engine.models.loading import apply_lora, load_model, parse_dtype
from drift_engine.models.loss import (
    IGNORE_INDEX,
    fused_weighted_loss_sum,
    hf_trainer_loss,
    lm_head_parameters,
    model_hidden_states,
    packed_hidden_states,
    padded_normalizer_term,
    padded_weighted_sft_loss,
    weighted_sft_loss,
)
from drift_engine.models.patch import apply_fused_loss, remove_fused_loss

# Imported on first use: they need transformers.Trainer (and so accelerate).
_HF_TRAINER = ("DriftDataCollator", "DriftLossMixin", "DriftTrainer")


def __getattr__(name: str) -> Any:
    if name in _HF_TRAINER:
        from drift_engine.models import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DriftDataCollator",
    "DriftLossMixin",
    "DriftTrainer",
    "IGNORE_INDEX",
    "apply_fused_loss",
    "apply_lora",
    "fused_weighted_loss_sum",
    "hf_trainer_loss",
    "lm_head_parameters",
    "load_model",
    "model_hidden_states",
    "packed_hidden_states",
    "padded_normalizer_term",
    "padded_weighted_sft_loss",
    "parse_dtype",
    "remove_fused_loss",
    "weighted_sft_loss",
]
