"""One line to make a Hugging Face causal LM compute its training loss with the fused kernel.

    model = apply_fused_loss(AutoModelForCausalLM.from_pretrained(...))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss; out.logits is None
    out = model(input_ids, labels=labels, token_weights=u)        # Σ u·CE / count

With labels, the patched forward runs the base model (embeddings, layers, final norm), and the
LM head's weight goes to drift-engine's fused cross-entropy together with the hidden states
of the labelled positions: full-vocabulary logits never exist. The loss is the model's own
(Hugging Face's ``ForCausalLMLoss``: labels aligned with ``input_ids``, shifted inside; or
pre-shifted ``shift_labels``; divided by ``num_items_in_batch`` when given, else by the count
of labels other than -100), so a plain ``transformers.Trainer`` (which passes
``num_items_in_batch``) stays exact under gradient accumulation. Without labels the original
forward runs (generation, logits).

No per-model code: any ``*ForCausalLM`` whose decoder is its ``base_model`` works, with the
LM head read as :func:`~drift_engine.models.lm_head_parameters` does (tied or not, bias, Gemma
2's final softcap, Cohere's and Granite's logit scales).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any

import torch

from drift_engine.errors import DriftError
from drift_engine.models.loss import (
    IGNORE_INDEX,
    _causal_lm,
    _decoder,
    _logit_scale,
    fused_weighted_loss_sum,
    lm_head_parameters,
)

_MARK = "_drift_fused_loss_impl"


def apply_fused_loss(model: torch.nn.Module, *, impl: str = "auto") -> torch.nn.Module:
    """Patch ``model`` (a transformers causal LM, or a peft model around one) in place so that
    calls with ``labels`` compute the loss with the fused cross-entropy (``impl``: "auto",
    "triton" or "torch") and return no logits; returns ``model``. The patched forward also
    takes ``token_weights`` ``(B, L)`` aligned with ``labels`` (the loss is then
    ``Σ u·CE / count``). Patching twice only changes ``impl``; :func:`remove_fused_loss`
    restores the original forward."""
    causal_lm = _causal_lm(model)
    _decoder(causal_lm)  # fail now, not at the first training step
    lm_head_parameters(causal_lm)
    if _MARK in causal_lm.__dict__:
        setattr(causal_lm, _MARK, impl)
        return model
    setattr(causal_lm, _MARK, impl)
    original = causal_lm.forward  # the class's forward, bound

    @functools.wraps(type(causal_lm).forward)
    def forward(
        self: torch.nn.Module,
        *args: Any,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None and shift_labels is None:
            if token_weights is not None:
                raise DriftError("token_weights were given without labels; pass labels too")
            return original(*args, **kwargs)
        return _fused_forward(
            self, args, kwargs, labels, shift_labels, token_weights, num_items_in_batch
        )

    # Keep the original signature (generate() and the Trainer's column filter read it), with
    # token_weights added.
    signature = inspect.signature(type(causal_lm).forward)
    params = list(signature.parameters.values())
    if "token_weights" not in signature.parameters:
        at = next(
            (i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD),
            len(params),
        )
        params.insert(
            at, inspect.Parameter("token_weights", inspect.Parameter.KEYWORD_ONLY, default=None)
        )
    forward.__signature__ = signature.replace(parameters=params)
    causal_lm.forward = types.MethodType(forward, causal_lm)
    return model


def remove_fused_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_fused_loss` (a model that is not patched is returned as is)."""
    causal_lm = _causal_lm(model)
    if _MARK in causal_lm.__dict__:
        del causal_lm.forward
        delattr(causal_lm, _MARK)
    return model


def _fused_forward(
    causal_lm: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    labels: torch.Tensor | None,  # (B, L) aligned with input_ids
    shift_labels: torch.Tensor | None,  # (B, L) already the next-token targets
    token_weights: torch.Tensor | None,  # (B, L) aligned with labels (or shift_labels)
    num_items_in_batch: torch.Tensor | int | None,
) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The logits are not computed, so how many to keep does not matter.
    kwargs = {k: v for k, v in kwargs.items() if k not in ("logits_to_keep", "return_dict")}
    outputs = _decoder(causal_lm)(*args, **kwargs)
    hidden = outputs[0]  # (B, L, H): the LM head's input
    scale = _logit_scale(causal_lm)
    if scale != 1.0:
        hidden = hidden * scale
    if shift_labels is None:
        targets = _shift_left(labels, IGNORE_INDEX)  # (B, L)
        if token_weights is not None:
            token_weights = _shift_left(token_weights, 0.0)
    else:
        targets = shift_labels
    if targets.shape != hidden.shape[:-1]:
        raise DriftError(
            f"labels have shape {tuple(targets.shape)} but the inputs {tuple(hidden.shape[:-1])}"
        )
    if token_weights is not None and token_weights.shape != targets.shape:
        raise DriftError(
            f"token_weights have shape {tuple(token_weights.shape)} but labels "
            f"{tuple(targets.shape)}; give one weight per label"
        )
    targets = targets.reshape(-1).to(hidden.device)  # (B·L,)
    if token_weights is None:
        coef = torch.ones(targets.shape, dtype=torch.float32, device=hidden.device)
    else:
        coef = token_weights.reshape(-1).to(hidden.device, torch.float32)
    weight, bias, softcap = lm_head_parameters(causal_lm)
    loss_sum = fused_weighted_loss_sum(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        softcap,
        targets,
        coef,
        impl=getattr(causal_lm, _MARK),
    )
    if num_items_in_batch is None:
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=loss_sum.device)
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    extra = {k: v for k, v in outputs.items() if k in names}
    return CausalLMOutputWithPast(loss=loss_sum / count, logits=None, **extra)


def _shift_left(values: torch.Tensor, fill: float) -> torch.Tensor:
    """``out[:, t] = values[:, t+1]``, ``fill`` in the last column (the next-token layout)."""
    out = torch.full_like(values, fill)
    out[:, :-1] = values[:, 1:]
    return out


__all__ = ["apply_fused_loss", "remove_fused_loss"]
