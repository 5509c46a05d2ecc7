"""Hidden states and the fused weighted loss of a Hugging Face causal LM on packed batches.

Full-vocabulary logits never exist: the base model runs up to its final norm, and the LM
head's weight goes to the fused cross-entropy together with the hidden states of the
trained tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from drift_engine.attention.varlen import cu_seqlens_from_lengths
from drift_engine.data.packing import _check_loss_mode
from drift_engine.errors import ConfigError, DriftError
from drift_engine.kernels.labels import IGNORE_INDEX

T = TypeVar("T")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``*ForCausalLM`` inside ``model`` (itself, or under a peft wrapper)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _decoder(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The base model (embeddings, layers, final norm) without the LM head."""
    decoder = getattr(causal_lm, "base_model", None)
    if decoder is None or decoder is causal_lm:
        raise DriftError(
            f"cannot find the base model of {type(causal_lm).__name__}: expected a transformers "
            "*ForCausalLM whose base_model_prefix names its decoder (e.g. `model`)"
        )
    return decoder


def lm_head_parameters(
    model: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """``(weight (V, H), bias (V,) | None, final-logit softcap | None)`` of the LM head.

    With tied embeddings the weight is the input embedding matrix (the same parameter).
    """
    causal_lm = _causal_lm(model)
    head = causal_lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise DriftError(f"{type(causal_lm).__name__} has no LM head (get_output_embeddings())")
    if hasattr(head, "base_layer"):
        raise ConfigError(
            "the LM head is wrapped by an adapter (e.g. LoRA on lm_head); the fused loss reads the "
            "head's weight directly: leave lm_head out of the adapter's target modules"
        )
    weight = head.weight
    if hasattr(weight, "ds_id"):
        raise ConfigError(
            "the LM head's weight is partitioned by DeepSpeed ZeRO-3 and only gathered inside its "
            "own forward; use ZeRO stage 1/2, DDP, or drift-engine's trainer (FSDP2)"
        )
    config = causal_lm.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return weight, getattr(head, "bias", None), softcap


def _logit_scale(causal_lm: torch.nn.Module) -> float:
    """Factor some models apply to the logits, folded into the hidden states instead
    (``logits = (s·h) @ W.T``): Cohere multiplies by ``logit_scale``, Granite divides by
    ``logits_scaling``."""
    config = causal_lm.config
    scale = 1.0
    if isinstance(getattr(config, "logit_scale", None), (int, float)):
        scale *= float(config.logit_scale)
    if isinstance(getattr(config, "logits_scaling", None), (int, float)):
        scale /= float(config.logits_scaling)
    return scale


def packed_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (1, T) int64
    position_ids: torch.Tensor,  # (1, T) restarting at 0 per sequence
    cu_seqlens: torch.Tensor,  # (B+1,) int32
    max_seqlen: int,
) -> torch.Tensor:  # (T, H): the LM head's input
    """Run the base model on one packed row; return the LM head's input for every token."""
    causal_lm = _causal_lm(model)
    decoder = _decoder(causal_lm)
    device = causal_lm.get_input_embeddings().weight.device
    input_ids = input_ids.to(device, non_blocking=True)
    position_ids = position_ids.to(device, non_blocking=True)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
    outputs = decoder(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=False,
        # transformers' flash-attention keywords, forwarded by the decoder layers to the
        # attention function: drift_varlen and flash_attention_* use them as the boundaries.
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
    )
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state  # (1, T, H)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
    scale = _logit_scale(causal_lm)
    return hidden * scale if scale != 1.0 else hidden


def model_hidden_states(
    model: torch.nn.Module, batch: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """``(hidden (T, H), head_weight (V, H), head_bias (V,) | None, softcap | None)``.

    ``batch`` is a :class:`~drift_engine.data.packing.PackedBatch` (or any object with its
    ``input_ids``, ``position_ids``, ``cu_seqlens`` and ``max_seqlen``). ``hidden`` is the LM
    head's input (final-norm hidden states, times any logit scale the model applies), so
    ``hidden @ head_weight.T + head_bias`` are the model's logits before the final softcap.
    Works with tied embeddings, peft-wrapped models and any attention implementation that
    handles packed rows (drift_varlen, flash_attention_*, sdpa, eager).
    """
    hidden = packed_hidden_states(
        model, batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen
    )
    weight, bias, softcap = lm_head_parameters(model)
    return hidden, weight, bias, softcap


def _trained_rows(labels: torch.Tensor, count: int | None) -> torch.Tensor:
    """Indices (N,) of rows with a label. With ``count`` known on the host: no sync."""
    trained = labels != IGNORE_INDEX  # (T,)
    if count is not None:
        return torch.nonzero_static(trained, size=count).squeeze(1)
    return trained.nonzero().squeeze(1)


def fused_weighted_loss_sum(
    hidden: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    softcap: float | None,
    labels: torch.Tensor,  # (T,) int64, IGNORE_INDEX where not trained
    token_weights: torch.Tensor,  # (T,) fp32
    *,
    num_trained: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:  # scalar fp32: Σ_t token_weights[t] · CE_t
    """Σ token_weights·cross-entropy over the trained rows, without logits.

    Only the trained rows reach the loss (in DRIFT usually the last assistant turn: a small
    part of the tokens). Under autocast the GEMMs run in the autocast dtype, as the LM head's
    ``nn.Linear`` would.
    """
    from drift_engine.ops import fused_linear_cross_entropy

    labels = labels.to(hidden.device, non_blocking=True)
    token_weights = token_weights.to(hidden.device, non_blocking=True)
    if num_trained != 0:  # keep all (ignored) rows when nothing is trained: loss 0, zero grads
        rows = _trained_rows(labels, num_trained)  # (N,)
        hidden, labels, token_weights = hidden[rows], labels[rows], token_weights[rows]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        token_weights=token_weights,
        bias=bias,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        softcap=softcap,
        impl=impl,
        check_labels=False,
    )


def weighted_sft_loss(
    model: torch.nn.Module,
    batch: Any,
    normalizer: float | torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """DRIFT's importance-weighted SFT loss of one packed micro-batch, divided by ``normalizer``.

    ``Σ_t batch.token_weights[t] · CE(logits_t, batch.labels[t]) / normalizer`` with the fused
    cross-entropy (``impl``: "auto", "triton" or "torch"). ``token_weights`` already holds each
    trajectory's weight over its trained-token count, so the sum is ``Σ_i w_i·ℓ_i``; the
    normaliser is the step's global trajectory count (or Σw, or token count) so that gradient
    accumulation does not change the result. None means this batch's ``num_trajectories``.
    ``batch.num_trained_tokens`` (when present) must equal the number of labels other than
    -100: it sizes the selection of trained rows without a host synchronisation.
    """
    hidden, weight, bias, softcap = model_hidden_states(model, batch)
    loss_sum = fused_weighted_loss_sum(
        hidden,
        weight,
        bias,
        softcap,
        batch.labels,
        batch.token_weights,
        num_trained=getattr(batch, "num_trained_tokens", None),
        impl=impl,
    )
    if normalizer is None:
        normalizer = batch.num_trajectories
    return loss_sum / normalizer


def padded_targets(
    labels: torch.Tensor,  # (B, L) Hugging Face layout: aligned with input_ids
    attention_mask: torch.Tensor | None,  # (B, L)
) -> torch.Tensor:  # (B, L): the label each position predicts, -100 where none
    """Next-token targets aligned with the positions that predict them (padding ignored)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(~attention_mask.to(labels.device, torch.bool), IGNORE_INDEX)
    return targets


def padded_normalizer_term(
    labels: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor | None,  # (B, L)
    weights: torch.Tensor,  # (B,)
    loss_mode: str = "trajectory",
) -> torch.Tensor:  # scalar fp32, on the labels' device
    """A padded batch's share of its optimizer step's loss normaliser (see
    :func:`padded_weighted_sft_loss`): its row count, Σ weights, or trained-token count."""
    _check_loss_mode(loss_mode)
    if loss_mode == "trajectory":
        return torch.tensor(float(labels.shape[0]), device=labels.device)
    if loss_mode == "weighted":
        return weights.to(labels.device, torch.float32).sum()
    return (padded_targets(labels, attention_mask) != IGNORE_INDEX).sum().to(torch.float32)


def padded_weighted_sft_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, L) int64
    attention_mask: torch.Tensor | None,  # (B, L), 1 for real tokens (None: no padding)
    labels: torch.Tensor,  # (B, L) int64, aligned with input_ids, -100 where not trained
    weights: torch.Tensor,  # (B,) importance weight of each trajectory
    *,
    position_ids: torch.Tensor | None = None,  # (B, L); default: 0.. over each row's real tokens
    token_weights: torch.Tensor | None = None,  # (B, L) aligned with labels; default all 1
    loss_mode: str = "trajectory",
    normalizer: float | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """DRIFT's loss for a padded batch (the reference trainer's layout), without logits.

    ``labels`` follow the Hugging Face convention (aligned with ``input_ids``; the model
    predicts ``labels[:, t+1]`` at position ``t``). With ``n_b`` the trained-token count of
    row ``b`` and ``u_bt`` the optional per-token weights (aligned with ``labels``), row
    ``b``'s loss is ``ℓ_b = Σ_t u_bt·CE_bt / n_b``, and the result, by ``loss_mode``
    (the names of ``drift-engine train --loss-mode``), is

    - "trajectory" (DRIFT): ``Σ_b w_b·ℓ_b / normalizer``, normaliser default ``B``;
    - "weighted": the same sum, normaliser default ``Σ_b w_b``;
    - "token": ``Σ_b,t w_b·u_bt·CE_bt / normalizer``, normaliser default ``Σ_b n_b``.

    Pass ``normalizer=`` a count global to the optimizer step (see
    :func:`padded_normalizer_term`) to make gradient accumulation exact. Rows without trained
    tokens contribute 0 (and still count in the "trajectory" normaliser).

    The padding is removed before the model runs: the real tokens of all rows are packed
    into one row (each row one sequence), so no compute is spent on padding.
    """
    _check_loss_mode(loss_mode)
    batch_size, length = input_ids.shape
    if labels.shape != input_ids.shape:
        raise DriftError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; "
            "give one label per input token (-100 where not trained)"
        )
    if weights.shape != (batch_size,):
        raise DriftError(
            f"weights must hold one importance weight per trajectory, shape ({batch_size},); "
            f"got {tuple(weights.shape)}"
        )
    if token_weights is not None and token_weights.shape != input_ids.shape:
        raise DriftError(
            f"token_weights have shape {tuple(token_weights.shape)} but input_ids "
            f"{tuple(input_ids.shape)}; give one weight per label (aligned with labels)"
        )
    device = input_ids.device
    if attention_mask is None:
        keep = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    else:
        keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, L)

    targets = padded_targets(labels.to(device), keep)  # (B, L)
    trained = targets != IGNORE_INDEX  # (B, L)
    counts = trained.sum(dim=1)  # (B,)
    per_row = weights.to(device=device, dtype=torch.float32)  # (B,)
    if loss_mode != "token":
        per_row = per_row / counts.clamp_min(1)
    coef = per_row[:, None].expand(batch_size, length)  # (B, L)
    if token_weights is not None:
        shifted = torch.zeros(batch_size, length, dtype=torch.float32, device=device)
        shifted[:, :-1] = token_weights[:, 1:].to(device, torch.float32)
        coef = coef * shifted
    coef = torch.where(trained, coef, 0.0)  # (B, L) fp32

    lengths = keep.sum(dim=1)  # (B,)
    flat_keep = keep.reshape(-1).nonzero().squeeze(1)  # (T,) real tokens, row-major
    if position_ids is None:
        position_ids = keep.cumsum(dim=1) - 1  # (B, L): 0.. over each row's real tokens
    packed_ids = input_ids.reshape(-1)[flat_keep].unsqueeze(0)  # (1, T)
    packed_positions = position_ids.to(device).reshape(-1)[flat_keep].unsqueeze(0)  # (1, T)
    hidden = packed_hidden_states(
        model, packed_ids, packed_positions, cu_seqlens_from_lengths(lengths), int(lengths.max())
    )  # (T, H)
    weight, bias, softcap = lm_head_parameters(model)
    loss_sum = fused_weighted_loss_sum(
        hidden,
        weight,
        bias,
        softcap,
        targets.reshape(-1)[flat_keep],
        coef.reshape(-1)[flat_keep],
        impl=impl,
    )
    if normalizer is None:
        normalizer = padded_normalizer_term(labels, keep, weights, loss_mode)
        if loss_mode != "trajectory":  # Σw or the token count can be 0
            normalizer = normalizer.to(loss_sum.device).clamp_min(torch.finfo(torch.float32).tiny)
    return loss_sum / normalizer


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def hf_trainer_loss(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    weights_key: str = "weights",
    token_weights_key: str = "token_weights",
    loss_mode: str = "trajectory",
    normalizer: float | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`padded_weighted_sft_loss` of a Hugging Face ``Trainer`` batch.

    ``inputs`` is the Trainer's batch: ``input_ids``, ``attention_mask`` (optional),
    ``labels``, ``position_ids`` (optional), the per-trajectory weights under
    ``weights_key`` and optional per-token weights under ``token_weights_key``. A wrapper
    with ``.module`` (DDP) is called through its own forward, so its gradient
    synchronisation runs as usual. ``drift_engine.models.DriftTrainer`` calls it with the
    step's normaliser; see docs/embedding.md.
    """
    missing = [k for k in ("input_ids", "labels", weights_key) if k not in inputs]
    if missing:
        raise DriftError(
            f"the batch lacks {', '.join(missing)}; the data collator must provide input_ids, "
            f"labels (-100 where not trained) and {weights_key!r} (one weight per trajectory). "
            "Keep extra columns with TrainingArguments(remove_unused_columns=False)"
        )

    def loss_of(inner: torch.nn.Module) -> torch.Tensor:
        return padded_weighted_sft_loss(
            inner,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            inputs["labels"],
            inputs[weights_key],
            position_ids=inputs.get("position_ids"),
            token_weights=inputs.get(token_weights_key),
            loss_mode=loss_mode,
            normalizer=normalizer,
            impl=impl,
        )

    inner = _unwrap(model)
    if inner is model:
        return loss_of(model)
    return call_as_forward(model, inner, loss_of)


def call_as_forward(
    model: torch.nn.Module, inner: torch.nn.Module, fn: Callable[[torch.nn.Module], T]
) -> T:
    """``fn(inner)`` run as the forward pass of ``model``, a wrapper around ``inner`` (DDP,
    an FSDP2 root, which is its own ``inner``), so that the wrapper's hooks run around it:
    FSDP2 gathers the root's parameters before and reduce-scatters their gradients after,
    DDP prepares its gradient all-reduce. An instance attribute shadows ``inner``'s forward
    for this one call; whatever was there before is restored."""
    previous = inner.__dict__.get("forward")
    inner.forward = lambda: fn(inner)
    try:
        return model()
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous
