"""The importance-weighted SFT trainer.

One optimizer step consumes ``grad_accum × world_size`` packed micro-batches of the epoch's
plan. Its loss is normalised by a count global to the step (trajectories, Σw or trained
tokens, by ``loss_mode``), summed over all its micro-batches and ranks before any forward
pass, so gradient accumulation and the number of ranks do not change the result::

    loss_step = Σ_{micro-batches, ranks} Σ_tokens token_weight · CE / normaliser_step

The normaliser and every per-step statistic stay on the device; the host reads them once
per step, between the gradient clipping and the optimizer step: a step whose loss or
gradient norm is not finite is skipped (no parameter or optimizer update), and
``optim.max_nonfinite_steps`` such steps in a row stop the run (``TrainingDivergedError``).

Data position is deterministic: epoch ``e`` packs the trajectories with seed
``seed + e``, and a step is a contiguous slice of that plan, so a checkpoint records
(epoch, micro-batch cursor) and resume recomputes the plan and continues from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drift_engine.data.packing import PackedBatch, PackingStats, pack, plan_rollouts
from drift_engine.data.rollouts import (
    META_TOKENIZER_VOCAB_HASH,
    RolloutSet,
    load_rollouts,
    validate_rollouts,
)
from drift_engine.errors import CheckpointError, ConfigError, TrainingDivergedError
from drift_engine.files import write_text_atomic
from drift_engine.models import apply_lora, load_model, parse_dtype, weighted_sft_loss
from drift_engine.models.compile import compile_decoder_layers
from drift_engine.models.loading import check_position_table
from drift_engine.models.sources import CHECKPOINT_MODEL_DIR, resolve_model_source
from drift_engine.train.checkpoint import (
    TrainerState,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    remove_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from drift_engine.train.config import TrainConfig
from drift_engine.train.distributed import (
    DistributedContext,
    all_reduce_sum_,
    clip_grad_norm_,
    gradient_sync,
    init_distributed,
    prepare_model,
    run_forward,
    shard_micro_batches,
    unwrap_model,
)
from drift_engine.train.metrics import (
    METRICS_FILE,
    MetricsWriter,
    ProgressBar,
    Throughput,
    TrainingEvaluation,
    weight_stats,
)
from drift_engine.train.schedule import build_scheduler
from drift_engine.weighting import weights_for

RUN_FILE = "run.json"


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including before a resume)
    checkpoint: Path | None  # the last checkpoint written
    last_metrics: dict[str, Any] | None  # the last line written to metrics.jsonl
    # why no step was trained: a resumed run whose checkpoint is already at its last step
    nothing_trained: str | None = None

    @property
    def model(self) -> Path | None:
        """The last checkpoint's Hugging Face export (``checkpoint-N/model``)."""
        return self.checkpoint / CHECKPOINT_MODEL_DIR if self.checkpoint is not None else None


@dataclass
class EpochPlan:
    """One epoch's micro-batches, in training order."""

    micro_batches: list[list[int]]  # trajectory indices of each packed micro-batch
    stats: PackingStats


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2), none on biases, norm scales and
    other vectors, as in the DRIFT reference (Hugging Face Trainer)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Trainer:
    """Weighted SFT of a Hugging Face causal LM on a rollouts file.

    ``on_step_end`` is called on every rank after each optimizer step (and after any
    checkpoint of that step) with the step's metrics record; raising from it stops
    training, as an interruption would. ``command`` (the command line, if any) goes into
    run.json and the exported model card.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        on_step_end: Callable[[dict[str, Any]], None] | None = None,
        command: str | None = None,
    ):
        self.config = config.validate()
        self.on_step_end = on_step_end
        self.command = command
        self.out_dir = Path(config.out)
        self.resumed_from: Path | None = None
        self.nothing_to_train: str | None = None  # set by _resume, see TrainResult
        self.resume_overrides: list[dict[str, Any]] = []
        self._notes: list[str] = []  # messages for the progress output, written by fit
        resume_path = self._check_output_folder()

        device = None if config.device == "auto" else torch.device(config.device)
        self.ctx: DistributedContext = init_distributed(config.strategy, device=device)
        self.compute_dtype = resolve_dtype(config.model.dtype, self.ctx.device)
        # Parameters and optimizer state stay float32; 16-bit compute is autocast (one
        # process, DDP) or the FSDP mixed-precision policy.
        mixed = self.compute_dtype != torch.float32
        self._autocast = mixed and self.ctx.strategy != "fsdp"
        _seed_everything(config.seed)  # identical on all ranks: LoRA init must match

        self.rollouts: RolloutSet = load_rollouts(config.data.path)
        if self.rollouts.num_trajectories == 0:
            raise ConfigError(
                f"{config.data.path} holds no trajectories; nothing to train. Check the "
                "rollout run that wrote it (every sample may have been filtered out)"
            )
        # a Hub id, a Hugging Face folder, a checkpoint folder or a GGUF file
        model_source = resolve_model_source(config.model.name_or_path)
        model = load_model(
            model_source,
            dtype=torch.float32,
            device=self.ctx.device,
            attn_implementation=config.model.attn_implementation,
            gradient_checkpointing=config.model.gradient_checkpointing,
        )
        check_position_table(
            model,
            self.rollouts.lengths().clamp_max(config.data.batch_tokens),  # as packing truncates
            fix="lower --batch-tokens to at most that many (longer trajectories are then "
            "truncated from the left), leave the long trajectories out of the rollouts, or, "
            "to train a longer context on purpose, raise max_position_embeddings in the "
            "model's config.json",
        )
        self.tokenizer = _load_tokenizer(model_source)
        self.tokenizer_check = self._tokenizer_check()
        validate_rollouts(
            self.rollouts,
            vocab_size=model.get_input_embeddings().num_embeddings,
            tokenizer=self.tokenizer if config.data.check_tokenizer else None,
            train_turns=config.data.train_turns,
        )
        self.weights = weights_for(  # (S,) float32, on the host (packing reads it)
            self.rollouts, config.weighting.resolve(), override=config.weighting.overrides
        )
        lora = config.model.lora
        if lora.r > 0:
            model = apply_lora(model, lora.r, lora.alpha, lora.target_modules, dropout=lora.dropout)
        self.model = prepare_model(
            model, self.ctx, mixed_precision=self.compute_dtype if mixed else None
        )
        if config.model.compile:
            # After fully_shard, which changes the layers' class (see models/compile.py).
            compile_decoder_layers(unwrap_model(self.model), backend=config.model.compile_backend)
        self.optimizer = torch.optim.AdamW(
            decay_parameter_groups(self.model, config.optim.weight_decay),
            lr=config.optim.lr,
            betas=config.optim.betas,
            eps=config.optim.eps,
            fused=self.ctx.device.type == "cuda",
        )

        self._cached_plan: tuple[int, EpochPlan] | None = None  # (epoch, plan)
        self.micro_batches_per_step = config.data.grad_accum * self.ctx.world_size
        self.total_steps = self._count_steps()
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.total_steps)

        self.state = TrainerState(
            total_steps=self.total_steps,
            world_size=self.ctx.world_size,
            config=config.to_dict(),
            data_fingerprint=_data_fingerprint(self.rollouts),
            model_signature=_model_signature(self.model),
        )
        if resume_path is not None:
            self._resume(resume_path)
        else:
            # Per-rank stream for dropout and anything else random during training.
            torch.manual_seed(config.seed + self.ctx.rank)

    # ------------------------------------------------------------------------- setup

    def _check_output_folder(self) -> Path | None:
        """The checkpoint to resume from (None: start at step 0).

        ``--resume`` in a folder whose run stopped before its first checkpoint (run.json or
        metrics.jsonl, no checkpoint) starts it again from step 0, so ``--resume`` is the one
        command that continues any interrupted run.
        """
        resume = self.config.checkpoint.resume
        started = any((self.out_dir / name).exists() for name in (RUN_FILE, METRICS_FILE))
        has_checkpoint = bool(list_checkpoints(self.out_dir))
        if resume is None:
            if has_checkpoint or started:
                raise ConfigError(
                    f"output folder {self.out_dir} already holds a training run; pass --resume "
                    "to continue it (from its newest checkpoint, or from the start if it "
                    "stopped before its first one), or choose another --out"
                )
            return None
        if resume == "latest" and started and not has_checkpoint:
            self._notes.append(
                f"{self.out_dir} holds a run that stopped before its first checkpoint; "
                "starting it again from step 0"
            )
            return None
        path = resolve_resume(resume, self.out_dir)
        if path.resolve().parent != self.out_dir.resolve() and (has_checkpoint or started):
            # Resuming replaces the run in --out from the checkpoint's step on: a checkpoint
            # of another folder would mix two runs and drop this one's newer checkpoints.
            raise ConfigError(
                f"--resume {path} is a checkpoint of another folder, and --out {self.out_dir} "
                "already holds a run; resume into an empty --out (or the checkpoint's own "
                "folder), or choose another --out"
            )
        return path

    def _tokenizer_check(self) -> str:
        """How the data's tokenizer identity is checked against the model's (for run.json);
        raises when the model has no tokenizer to check it against."""
        if META_TOKENIZER_VOCAB_HASH not in self.rollouts.metadata:
            return "not recorded in the data"
        if not self.config.data.check_tokenizer:
            return "skipped (data.check_tokenizer = false)"
        if self.tokenizer is None:
            raise ConfigError(
                f"the rollouts record the tokenizer they were sampled with, but the model "
                f"{self.config.model.name_or_path} has no tokenizer files to check it against; "
                "add the tokenizer files to the model folder, or pass --no-check-tokenizer "
                "to train without the check (recorded in run.json)"
            )
        return "passed"

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """Epoch ``epoch``'s packed micro-batches and packing statistics (only the current
        epoch's plan is kept in memory)."""
        if self._cached_plan is None or self._cached_plan[0] != epoch:
            data = self.config.data
            micro_batches, stats = plan_rollouts(
                self.rollouts,
                data.batch_tokens,
                seed=self.config.seed + epoch,
                train_turns=data.train_turns,
                shuffle=data.shuffle,
            )
            self._cached_plan = (epoch, EpochPlan(micro_batches, stats))
        return self._cached_plan[1]

    def _count_steps(self) -> int:
        data = self.config.data
        steps = 0
        for epoch in range(data.epochs):
            steps += math.ceil(
                len(self.epoch_plan(epoch).micro_batches) / self.micro_batches_per_step
            )
            if data.max_steps is not None and steps >= data.max_steps:
                return data.max_steps
        return steps

    def _resume(self, path: Path) -> None:
        saved = read_trainer_state(path)
        saved_config = saved.config
        saved_data = saved_config.get("data", {})
        for key in _RESUME_FIXED_DATA_KEYS:
            now = getattr(self.config.data, key)
            if key in saved_data and saved_data[key] != now:
                raise ConfigError(
                    f"--resume: data.{key} is {now!r} but the checkpoint {path} was trained "
                    f"with {saved_data[key]!r}; resume with the same data settings"
                )
        if saved_config.get("seed", self.config.seed) != self.config.seed:
            raise ConfigError(
                f"--resume: seed {self.config.seed} differs from the checkpoint's "
                f"{saved_config['seed']}; the data order depends on it, use the same seed"
            )
        signature = self.state.model_signature
        if saved.model_signature and saved.model_signature != signature:
            raise CheckpointError(
                f"--resume: the checkpoint {path} holds a {saved.model_signature.get('model_type')} "
                f"model with {saved.model_signature.get('parameters')} trainable tensors, but "
                f"--model {self.config.model.name_or_path} builds a {signature['model_type']} "
                f"model with {signature['parameters']} (another architecture, size or LoRA "
                "setting); resume with the model and LoRA settings the run was started with"
            )
        changes = self._resume_changes(saved)
        if changes and not self.config.checkpoint.allow_config_change:
            listed = "; ".join(f"{c['key']}: {c['checkpoint']!r} -> {c['now']!r}" for c in changes)
            raise ConfigError(
                f"--resume: the run in {path} was trained with other settings ({listed}); "
                "resume with the original ones, or pass --allow-config-change to continue "
                "with the new ones (recorded in run.json)"
            )
        self.resume_overrides = changes
        for change in changes:
            self._notes.append(
                f"resuming with {change['key']} = {change['now']!r} (the checkpoint has "
                f"{change['checkpoint']!r}; --allow-config-change)"
            )
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ctx)
        state.total_steps = self.total_steps
        state.world_size = self.ctx.world_size
        state.config = self.config.to_dict()
        state.data_fingerprint = self.state.data_fingerprint
        state.model_signature = signature
        self.state = state
        self.resumed_from = path
        self.nothing_to_train = self._nothing_left(path)
        if self.nothing_to_train is None:  # a run that trains nothing keeps its folder as is
            self._discard_newer_checkpoints()

    def _nothing_left(self, path: Path) -> str | None:
        """Why the run resumed from ``path`` has no step left (None: it has some)."""
        step, data = self.state.step, self.config.data
        if step < self.total_steps:
            return None
        if data.max_steps is not None and self.total_steps == data.max_steps:
            where = "already at" if step == data.max_steps else "past"
            return (
                f"the checkpoint {path} is at step {step}, {where} --max-steps "
                f"{data.max_steps}; pass a larger --max-steps to train further"
            )
        return (
            f"the checkpoint {path} is at step {step}, the end of the run's {data.epochs} "
            f"epoch(s) ({self.total_steps} steps); pass a larger --epochs to train further"
        )

    def _resume_changes(self, saved: TrainerState) -> list[dict[str, Any]]:
        """Settings that differ from the checkpoint's and change what is trained: the data
        (by content: a moved file is the same data), the model, the weighting, the optimizer
        and the schedule."""
        old, now = _flatten(saved.config), _flatten(self.config.to_dict())
        changes = []
        for key in sorted(set(old) | set(now)):
            if not key.startswith(_RESUME_CHECKED_PREFIXES) or key in _RESUME_FREE_KEYS:
                continue
            if key not in old or old[key] == now.get(key):
                continue
            if key == "data.path" and saved.data_fingerprint:
                continue  # compared by content below
            if key == "model.name_or_path" and _same_folder(old[key], now[key]):
                continue
            changes.append({"key": key, "checkpoint": old[key], "now": now.get(key)})
        fingerprint = self.state.data_fingerprint
        if saved.data_fingerprint and saved.data_fingerprint != fingerprint:
            changes.append(
                {
                    "key": "data (content)",
                    "checkpoint": f"{saved.config.get('data', {}).get('path')} "
                    f"({saved.data_fingerprint.get('trajectories')} trajectories)",
                    "now": f"{self.config.data.path} ({fingerprint['trajectories']} trajectories)",
                }
            )
        return changes

    def _discard_newer_checkpoints(self) -> None:
        """Remove the checkpoints of ``out`` newer than the resumed step: they belong to the
        run being replaced, and keeping them would mix two runs in one folder."""
        newer = [
            path
            for path in list_checkpoints(self.out_dir)
            if checkpoint_step(path) > self.state.step
        ]
        if self.ctx.is_main:
            for path in newer:
                remove_checkpoint(path)
        for path in newer:
            self._notes.append(
                f"removed {path.name}: newer than the resumed step {self.state.step}, it "
                "belonged to the run being continued from an older checkpoint"
            )

    # ------------------------------------------------------------------------- loop

    def _steps(self) -> Iterator[tuple[int, list[list[int]], bool]]:
        """(epoch, this step's micro-batches (global), first step of the epoch?) from the
        current data position, advancing it."""
        state = self.state
        while state.step < self.total_steps and state.epoch < self.config.data.epochs:
            plan = self.epoch_plan(state.epoch).micro_batches
            if state.micro_batch_cursor >= len(plan):
                state.epoch += 1
                state.micro_batch_cursor = 0
                continue
            start = state.micro_batch_cursor
            stop = min(start + self.micro_batches_per_step, len(plan))
            state.micro_batch_cursor = stop
            yield state.epoch, plan[start:stop], start == 0

    def fit(self) -> TrainResult:
        """Train to the end (or ``max_steps``); checkpoint periodically and at the end. A
        resumed run already at its end trains nothing and says why (``nothing_trained``)."""
        config, ctx = self.config, self.ctx
        if self.nothing_to_train is not None:  # the output folder is left untouched
            return TrainResult(self.state.step, self.resumed_from, None, self.nothing_to_train)
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_info()
        metrics = MetricsWriter(
            self.out_dir,
            resume_step=self.state.step,
            enabled=ctx.is_main,
            report_to=config.report_to,
            run_config=config.to_dict(),
            log_lines=not config.progress,
            total_steps=self.total_steps,
        )
        progress = ProgressBar(
            self.total_steps, self.state.step, enabled=ctx.is_main and config.progress
        )
        for note in self._notes:
            progress.write(note)
        progress.write(
            f"epoch {self.state.epoch}: {self.epoch_plan(self.state.epoch).stats.summary()}"
        )
        evaluation = TrainingEvaluation.create(config.eval, self.tokenizer, self.compute_dtype)
        throughput = Throughput()
        last_checkpoint: Path | None = self.resumed_from
        start_step = self.state.step
        record: dict[str, Any] | None = None
        every = config.checkpoint.every_steps
        nonfinite_in_row = 0
        self.model.train()
        try:
            for epoch, step_batches, epoch_start in self._steps():
                record = self.train_step(step_batches)
                self.state.step += 1
                if record["skipped"]:
                    self.state.skipped_steps += 1
                    nonfinite_in_row += 1
                else:
                    nonfinite_in_row = 0
                self.state.tokens_seen += record["tokens"]
                tokens_per_s, seconds = throughput.step(record["tokens"])
                record = {
                    "step": self.state.step,
                    "epoch": epoch,
                    **record,
                    "tokens_per_s": tokens_per_s,
                    "step_time_s": seconds,
                    **weight_stats(self.weights, step_batches),
                }
                if epoch_start:
                    record["packing_efficiency"] = self.epoch_plan(epoch).stats.efficiency
                if evaluation is not None and evaluation.due(self.state.step, self.total_steps):
                    record.update(evaluation(unwrap_model(self.model)))
                    throughput.restart()
                metrics.write(record)
                progress.update(record["loss"], tokens_per_s, record["lr"])
                if record["skipped"]:
                    self._nonfinite_step(record, nonfinite_in_row, last_checkpoint, progress)
                elif every and self.state.step % every == 0 and self.state.step < self.total_steps:
                    last_checkpoint = self._save()
                if self.on_step_end is not None:
                    self.on_step_end(record)
            if self.state.step > start_step:
                last_checkpoint = self._save()
        finally:
            progress.close()
            metrics.close()
        return TrainResult(self.state.step, last_checkpoint, record)

    def _nonfinite_step(
        self, record: dict[str, Any], in_row: int, last_checkpoint: Path | None, progress: Any
    ) -> None:
        """Report a skipped step; raise once ``optim.max_nonfinite_steps`` came in a row."""
        limit = self.config.optim.max_nonfinite_steps
        what = f"loss {record['loss']}, gradient norm {record['grad_norm']}"
        if in_row < limit:
            progress.write(
                f"step {record['step']}: {what}; step skipped, no update applied "
                f"({in_row} in a row; the run stops at {limit})"
            )
            return
        raise TrainingDivergedError(
            f"training diverged: {in_row} steps in a row up to step {record['step']} had a "
            f"non-finite loss or gradient norm ({what}); they were skipped and the run "
            f"stopped. The last checkpoint is {last_checkpoint or 'none'}; resume from it "
            "(--resume) with a lower --lr or a smaller --grad-clip, check the data's "
            "weights, or allow more skipped steps (optim.max_nonfinite_steps)"
        )

    def pack_micro_batch(self, indices: list[int]) -> PackedBatch:
        """The rollout rows ``indices`` packed as this trainer trains them."""
        data = self.config.data
        return pack(
            self.rollouts,
            indices,
            self.weights,
            train_turns=data.train_turns,
            loss_mode=data.loss_mode,
            max_tokens=data.batch_tokens,
        )

    def train_step(self, step_batches: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over ``step_batches`` (the step's micro-batches on all ranks,
        each a list of rollout rows); returns the step's loss, lr, grad_norm and global
        token/trajectory counts. ``fit`` drives it; benchmarks may call it directly.
        """
        config, ctx = self.config, self.ctx
        data = config.data
        # Every rank packs the whole step (cheap, on the host) so that all ranks agree on
        # the token-balanced assignment without communicating.
        packed = [self.pack_micro_batch(indices) for indices in step_batches]
        batches = shard_micro_batches(packed, ctx)  # equal count per rank (padding if short)
        # Host-side counts of this rank's micro-batches, summed over ranks in one collective:
        # [normaliser, tokens, trained tokens, trajectories]. float64 keeps counts exact.
        counts = torch.tensor(
            [
                sum(b.normalizer_term(data.loss_mode) for b in batches),
                sum(b.num_tokens for b in batches),
                sum(b.num_trained_tokens for b in batches),
                sum(b.num_trajectories for b in batches),
            ],
            dtype=torch.float64,
        )
        counts = _to_device(counts, ctx.device)  # (4,)
        all_reduce_sum_(counts, ctx)
        # Σw can be 0 when every weight of the step underflowed; the loss sum is 0 then too.
        normalizer = counts[0].to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
        # DDP and FSDP average gradients over ranks; the global normaliser already divides
        # by the whole step's count, so scale each rank's loss to turn the mean into a sum.
        grad_scale = float(ctx.world_size) if ctx.strategy in ("ddp", "fsdp") else 1.0

        loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
        for i, batch in enumerate(batches):
            batch = batch.to(ctx.device, non_blocking=True)
            with gradient_sync(self.model, ctx, last_micro_batch=i == len(batches) - 1):
                with torch.autocast(
                    ctx.device.type, dtype=self.compute_dtype, enabled=self._autocast
                ):
                    # scalar: this micro-batch's share of the step loss
                    loss = run_forward(
                        self.model,
                        lambda m, b=batch: weighted_sft_loss(
                            m, b, normalizer, impl=config.model.loss_impl
                        ),
                    )
                (loss * grad_scale if grad_scale != 1.0 else loss).backward()
            loss_sum += loss.detach().float()
        all_reduce_sum_(loss_sum, ctx)

        max_norm = config.optim.grad_clip or math.inf
        grad_norm = clip_grad_norm_(self.model, max_norm, ctx)  # norm before clipping
        lr = self.scheduler.get_last_lr()[0]

        # The one host sync of the step, before the update: a non-finite loss or gradient
        # norm (the same on every rank, both being global) skips the optimizer step.
        loss_value, grad_norm_value = torch.stack(
            [loss_sum, grad_norm.detach().float().reshape(())]
        ).tolist()
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm_value))
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the data position either way
        self.optimizer.zero_grad(set_to_none=True)
        _, tokens, trained, trajectories = counts.tolist()
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": int(tokens),
            "trained_tokens": int(trained),
            "trajectories": int(trajectories),
            "skipped": skipped,
        }

    # ------------------------------------------------------------------------- output

    def _save(self) -> Path:
        return save_checkpoint(
            self.out_dir,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.ctx,
            tokenizer=self.tokenizer,
            export_dtype=self.compute_dtype if self.compute_dtype != torch.float32 else None,
            keep_last=self.config.checkpoint.keep_last,
            model_card=self._model_card(),
            merge_lora=self.config.checkpoint.merge_lora,
        )

    def _model_card(self) -> str:
        """model/README.md of a checkpoint: what was trained, on what, and how."""
        config, state = self.config, self.state
        w = config.weighting.resolve()
        lora = config.model.lora
        export = "full model"
        if lora.r > 0:
            export = (
                "merged model (LoRA folded in)"
                if config.checkpoint.merge_lora
                else ("LoRA adapter (peft)")
            )
        lines = [
            "---",
            f"base_model: {config.model.name_or_path}",
            "library_name: transformers"
            if export != "LoRA adapter (peft)"
            else "library_name: peft",
            "tags: [drift-engine, drift, weighted-sft]",
            "---",
            "",
            f"# {Path(config.out).name or 'drift-engine run'}, step {state.step}",
            "",
            "Importance-weighted SFT (DRIFT) with drift-engine.",
            "",
            f"- base model: `{config.model.name_or_path}`",
            f"- data: `{config.data.path}` ({self.rollouts.num_trajectories} trajectories, "
            f"{self.rollouts.num_tokens} tokens)",
            "- weights: "
            + (
                f"recomputed with γ = {w.gamma}, β = {w.beta}"
                if config.weighting.overrides or self.rollouts.weights is None
                else "stored in the data file"
            ),
            f"- steps: {state.step} of {state.total_steps} "
            f"(epoch {state.epoch}, {state.tokens_seen} tokens seen, "
            f"{state.skipped_steps} skipped as non-finite)",
            f"- loss: `{config.data.loss_mode}`, trained turns: `{config.data.train_turns}`, "
            f"lr {config.optim.lr} ({config.schedule.name}), LoRA r = {lora.r}",
            f"- this folder: {export}",
        ]
        if self.command:
            lines += ["", "Command:", "", f"    {self.command}"]
        return "\n".join(lines) + "\n"

    def _write_run_info(self) -> None:
        rs = self.rollouts
        plan = self.epoch_plan(0)
        info = {
            "config": self.config.to_dict(),
            "command": self.command,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "resume_overrides": self.resume_overrides,
            "tokenizer_check": self.tokenizer_check,
            "world_size": self.ctx.world_size,
            "strategy": self.ctx.strategy,
            "device": str(self.ctx.device),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "total_steps": self.total_steps,
            "trajectories": rs.num_trajectories,
            "tokens": rs.num_tokens,
            "weights_mean": float(self.weights.mean()) if rs.num_trajectories else math.nan,
            "weights_max": float(self.weights.max()) if rs.num_trajectories else math.nan,
            "packing_epoch0": dataclasses.asdict(plan.stats)
            | {"efficiency": plan.stats.efficiency, "summary": plan.stats.summary()},
            "trainable_parameters": sum(
                p.numel() for p in self.model.parameters() if p.requires_grad
            ),
        }
        write_text_atomic(self.out_dir / RUN_FILE, json.dumps(info, indent=2) + "\n")


def train(
    config: TrainConfig, *, on_step_end: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Run weighted SFT as configured; see ``Trainer``."""
    return Trainer(config, on_step_end=on_step_end).fit()


# ----------------------------------------------------------------------------- helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Files of which a model folder with a tokenizer holds at least one.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


def _load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, or None when the model folder/id has none (config-only
    models); the export then holds the model alone. (transformers builds an empty
    tokenizer from config.json alone for some architectures: a local folder without any
    tokenizer file counts as having none.)"""
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, KeyError):
        return None


# Resume checks (see Trainer._resume): data settings that fix the data order, never
# changeable; sections whose change alters what is trained, refused unless
# checkpoint.allow_config_change; keys of those sections that may change freely.
_RESUME_FIXED_DATA_KEYS = ("train_turns", "loss_mode", "batch_tokens", "shuffle")
_RESUME_CHECKED_PREFIXES = (
    "data.path", "model.name_or_path", "model.lora.", "weighting.", "optim.", "schedule.",
)  # fmt: skip
_RESUME_FREE_KEYS = {"optim.max_nonfinite_steps"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _same_folder(a: Any, b: Any) -> bool:
    try:
        return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def _data_fingerprint(rs: RolloutSet) -> dict[str, Any]:
    """Identity of a rollout set, cheap at any size: counts, and a hash of the boundaries,
    rewards, stored weights and 64 evenly spaced runs of 4096 tokens (a few reads even when
    the file is memory-mapped)."""
    h = hashlib.sha256()
    starts = torch.linspace(0, max(rs.num_tokens - 4096, 0), 64).long().unique()
    runs = [rs.input_ids[int(a) : int(a) + 4096] for a in starts]
    for tensor in (rs.cu_seqlens, rs.turn_rewards, rs.weights, *runs):
        if tensor is not None:
            h.update(tensor.contiguous().numpy().tobytes())
    return {
        "trajectories": rs.num_trajectories,
        "tokens": rs.num_tokens,
        "sha256": h.hexdigest(),
    }


def _model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture identity of the trained model: type and trainable tensor names/shapes."""
    hf_model = unwrap_model(model)
    h = hashlib.sha256()
    count = 0
    for name, param in hf_model.named_parameters():
        if param.requires_grad:
            h.update(f"{name}:{tuple(param.shape)};".encode())
            count += 1
    config = getattr(hf_model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(hf_model).__name__),
        "parameters": count,
        "sha256": h.hexdigest(),
    }


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without waiting for the device's queue (pinned, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


__all__ = [
    "EpochPlan",
    "Trainer",
    "TrainResult",
    "train",
    "resolve_dtype",
    "decay_parameter_groups",
]
