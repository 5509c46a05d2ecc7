"""Hugging Face causal LMs for packed training with the fused weighted loss.

    model = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bf16", device="cuda")
    loss = weighted_sft_loss(model, packed_batch, normalizer)   # no logits materialised

For other trainers (a Hugging Face ``Trainer.compute_loss`` with padded batches) see
``hf_trainer_loss`` and docs/embedding.md.
"""

from drift_engine.models.loading import apply_lora, load_model, parse_dtype
from drift_engine.models.loss import (
    IGNORE_INDEX,
    fused_weighted_loss_sum,
    hf_trainer_loss,
    lm_head_parameters,
    model_hidden_states,
    packed_hidden_states,
    padded_weighted_sft_loss,
    weighted_sft_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "apply_lora",
    "fused_weighted_loss_sum",
    "hf_trainer_loss",
    "lm_head_parameters",
    "load_model",
    "model_hidden_states",
    "packed_hidden_states",
    "padded_weighted_sft_loss",
    "parse_dtype",
    "weighted_sft_loss",
]
