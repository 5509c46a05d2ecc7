"""drift-engine's weighted fused loss inside a Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``).

    from drift_engine.models import DriftDataCollator, DriftTrainer

    trainer = DriftTrainer(model=model, args=args, train_dataset=rows,
                           data_collator=DriftDataCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.train()

Each row of the dataset holds ``input_ids``, optional ``labels`` (-100 where not trained;
default: every token), an importance weight under ``"weights"`` (default 1) and optional
per-token weights under ``"token_weights"`` (aligned with ``labels``).

Gradient accumulation is exact: the Trainer hands ``compute_loss`` the step's micro-batches
one at a time, and leaves the division by the accumulation steps to models that accept
``num_items_in_batch`` (most causal LMs do), so a per-micro-batch mean would be summed over
the micro-batches. ``DriftTrainer`` computes the normaliser of the whole optimizer step
(trajectories, Σ weights or trained tokens, summed over its micro-batches and processes)
when it collects them, divides each micro-batch's loss sum by it, and tells the Trainer so
(``loss_is_scaled_for_ga``, and ``model_accepts_loss_kwargs`` for transformers releases
before that attribute).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer

from drift_engine.data.packing import _check_loss_mode
from drift_engine.errors import ConfigError, DriftError
from drift_engine.models.loss import IGNORE_INDEX, hf_trainer_loss, padded_normalizer_term


class DriftDataCollator:
    """Pads rows into the batch :func:`~drift_engine.models.hf_trainer_loss` reads.

    Each feature is a mapping with ``input_ids`` (a list or 1-D tensor), optionally
    ``labels`` (same length, -100 where not trained; default: a copy of ``input_ids``),
    ``attention_mask``, the trajectory's importance weight under ``weights_key`` (a number;
    default 1.0) and per-token weights under ``token_weights_key`` (same length as
    ``input_ids``, aligned with ``labels``). The batch holds ``input_ids``,
    ``attention_mask``, ``labels`` (-100 on padding), ``weights`` ``(B,)`` float32 and, when
    any row has them, ``token_weights`` ``(B, L)`` float32 (1 where a row has none).
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        weights_key: str = "weights",
        token_weights_key: str = "token_weights",
    ):
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.weights_key = weights_key
        self.token_weights_key = token_weights_key

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DriftError("the data collator got an empty batch")
        rows = [self._row(i, f) for i, f in enumerate(features)]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        with_token_weights = any("token_weights" in r for r in rows)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, width, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        token_weights = torch.ones(batch_size, width) if with_token_weights else None
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[b, cols] = row["input_ids"]
            attention_mask[b, cols] = row["attention_mask"]
            labels[b, cols] = row["labels"]
            if token_weights is not None and "token_weights" in row:
                token_weights[b, cols] = row["token_weights"]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            self.weights_key: torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
        }
        if token_weights is not None:
            batch[self.token_weights_key] = token_weights
        return batch

    def _row(self, index: int, feature: Mapping[str, Any]) -> dict[str, Any]:
        if "input_ids" not in feature:
            raise DriftError(f"row {index} of the batch has no 'input_ids'")
        input_ids = torch.as_tensor(feature["input_ids"], dtype=torch.long).reshape(-1)
        n = input_ids.numel()
        if n == 0:
            raise DriftError(f"row {index} of the batch has no tokens; drop empty rows")
        row: dict[str, Any] = {"input_ids": input_ids}
        for key, name, dtype in (
            ("labels", "labels", torch.long),
            ("attention_mask", "attention_mask", torch.long),
            (self.token_weights_key, "token_weights", torch.float32),
        ):
            if feature.get(key) is None:
                continue
            value = torch.as_tensor(feature[key], dtype=dtype).reshape(-1)
            if value.numel() != n:
                raise DriftError(
                    f"row {index}: {key!r} has {value.numel()} entries but input_ids {n}; "
                    "give one per token"
                )
            row[name] = value
        row.setdefault("labels", input_ids.clone())
        row.setdefault("attention_mask", torch.ones(n, dtype=torch.long))
        row["labels"] = row["labels"].masked_fill(row["attention_mask"] == 0, IGNORE_INDEX)
        weight = feature.get(self.weights_key, 1.0)
        weight = float(torch.as_tensor(weight, dtype=torch.float32).reshape(()))
        if not weight >= 0 or weight == float("inf"):
            raise DriftError(
                f"row {index}: importance weight {self.weights_key!r} must be finite and >= 0, "
                f"got {weight}"
            )
        row["weight"] = weight
        return row


class DriftLossMixin:
    """Makes a ``transformers.Trainer`` subclass train with drift-engine's weighted fused loss.

    Put it first in the bases (``class MyTrainer(DriftLossMixin, SFTTrainer)``). Keyword
    arguments, all optional: ``loss_mode`` ("trajectory": DRIFT's mean over trajectories of
    ``w·ℓ``; "weighted": ``Σw·ℓ / Σw``; "token": weighted token mean — as
    ``drift-engine train --loss-mode``), ``weights_key`` and ``token_weights_key`` (the
    batch's weight columns), ``loss_impl`` ("auto", "triton" or "torch").

    Training loss of an optimizer step = ``Σ_micro-batches Σ_b w_b·ℓ_b / normaliser`` with
    the normaliser summed over the step's micro-batches (and processes), so gradient
    accumulation and the data-parallel world size do not change the loss or gradient.
    Evaluation batches are normalised by their own count.
    """

    # Read by training_step in transformers releases that have it (5.24 does, 5.17 not):
    # compute_loss already normalises over the accumulated step.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        loss_mode: str = "trajectory",
        weights_key: str = "weights",
        token_weights_key: str = "token_weights",
        loss_impl: str = "auto",
        **kwargs: Any,
    ):
        _check_loss_mode(loss_mode)
        self.drift_loss_mode = loss_mode
        self.drift_weights_key = weights_key
        self.drift_token_weights_key = token_weights_key
        self.drift_loss_impl = loss_impl
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if any(getattr(training_args, k, False) for k in ("packing", "padding_free")):  # TRL
            raise ConfigError(
                "packing/padding_free would merge rows and lose their weights; turn them off: "
                "the padding is removed before the model runs anyway (rows are packed per batch)"
            )
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ConfigError(
                f"{type(self).__name__} does not support nn.DataParallel (several GPUs visible to "
                "one process); launch with torchrun or accelerate launch, or set CUDA_VISIBLE_DEVICES"
            )
        # Older transformers (no loss_is_scaled_for_ga) skip the division by the accumulation
        # steps exactly when the model accepts loss kwargs and num_items_in_batch is given.
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the weight columns when remove_unused_columns drops what forward() does not take.
        super()._set_signature_columns_if_needed()
        for key in (self.drift_weights_key, self.drift_token_weights_key):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor]:
        """The step's micro-batches and its loss normaliser (summed over processes)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        total = torch.zeros((), dtype=torch.float32, device=device)
        for batch in batch_samples:
            self._check_batch(batch)
            total += padded_normalizer_term(
                batch["labels"].to(device),
                _to(batch.get("attention_mask"), device),
                batch[self.drift_weights_key].to(device),
                self.drift_loss_mode,
            )
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        # Σw can be 0 when every weight of the step is 0; the loss sum is 0 then too.
        return batch_samples, total.clamp_min(torch.finfo(torch.float32).tiny)

    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        missing = [k for k in ("input_ids", "labels", self.drift_weights_key) if k not in batch]
        if missing:
            raise DriftError(
                f"the batch lacks {', '.join(missing)}; use drift_engine.models.DriftDataCollator "
                f"(or a collator that gives input_ids, labels and {self.drift_weights_key!r})"
            )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_batch(inputs)
        # In training num_items_in_batch is the step normaliser from get_batch_samples; an
        # evaluation batch (the Trainer counts its tokens) is normalised by its own count.
        normalizer = num_items_in_batch if self.model.training else None
        loss = hf_trainer_loss(
            model,
            inputs,
            weights_key=self.drift_weights_key,
            token_weights_key=self.drift_token_weights_key,
            loss_mode=self.drift_loss_mode,
            normalizer=normalizer,
            impl=self.drift_loss_impl,
        )
        if normalizer is not None and self.accelerator.num_processes > 1:
            # The normaliser is global to all processes and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


class DriftTrainer(DriftLossMixin, Trainer):
    """``transformers.Trainer`` training with drift-engine's weighted fused loss: see
    :class:`DriftLossMixin` for its keyword arguments and :class:`DriftDataCollator` for the
    batch. Full-vocabulary logits never exist and padding is removed before the model runs."""


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


__all__ = ["DriftDataCollator", "DriftLossMixin", "DriftTrainer"]
