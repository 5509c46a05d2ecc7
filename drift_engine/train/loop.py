"""The importance-weighted SFT trainer.

One optimizer step consumes ``grad_accum × world_size`` packed micro-batches of the epoch's
plan. Its loss is normalised by a count global to the step (trajectories, Σw or trained
tokens, by ``loss_mode``), summed over all its micro-batches and ranks before any forward
pass, so gradient accumulation and the number of ranks do not change the result::

    loss_step = Σ_{micro-batches, ranks} Σ_tokens token_weight · CE / normaliser_step

The normaliser and every per-step statistic stay on the device; the host reads them once
per step, after the optimizer step, to log them.

Data position is deterministic: epoch ``e`` packs the trajectories with seed
``seed + e``, and a step is a contiguous slice of that plan, so a checkpoint records
(epoch, micro-batch cursor) and resume recomputes the plan and continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drift_engine.data.packing import PackedBatch, PackingStats, pack, plan_rollouts
from drift_engine.data.rollouts import RolloutSet, load_rollouts, validate_rollouts
from drift_engine.errors import ConfigError
from drift_engine.models import apply_lora, load_model, parse_dtype, weighted_sft_loss
from drift_engine.models.compile import compile_decoder_layers
from drift_engine.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
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
from drift_engine.weighting import WeightingConfig, weights_for

RUN_FILE = "run.json"


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including before a resume)
    checkpoint: Path | None  # the last checkpoint written
    last_metrics: dict[str, Any] | None  # the last line written to metrics.jsonl


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
    training, as an interruption would.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        on_step_end: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.config = config.validate()
        self.on_step_end = on_step_end
        self.out_dir = Path(config.out)
        self._check_output_folder()

        device = None if config.device == "auto" else torch.device(config.device)
        self.ctx: DistributedContext = init_distributed(config.strategy, device=device)
        self.compute_dtype = resolve_dtype(config.model.dtype, self.ctx.device)
        # Parameters and optimizer state stay float32; 16-bit compute is autocast (one
        # process, DDP) or the FSDP mixed-precision policy.
        mixed = self.compute_dtype != torch.float32
        self._autocast = mixed and self.ctx.strategy != "fsdp"
        _seed_everything(config.seed)  # identical on all ranks: LoRA init must match

        self.rollouts: RolloutSet = load_rollouts(config.data.path)
        model = load_model(
            config.model.name_or_path,
            dtype=torch.float32,
            device=self.ctx.device,
            attn_implementation=config.model.attn_implementation,
            gradient_checkpointing=config.model.gradient_checkpointing,
        )
        self.tokenizer = _load_tokenizer(config.model.name_or_path)
        validate_rollouts(
            self.rollouts,
            vocab_size=model.get_input_embeddings().num_embeddings,
            tokenizer=self.tokenizer,
            train_turns=config.data.train_turns,
        )
        self.weights = weights_for(  # (S,) float32, on the host (packing reads it)
            self.rollouts, _weighting_config(config), override=config.weighting.overrides
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
            total_steps=self.total_steps, world_size=self.ctx.world_size, config=config.to_dict()
        )
        if config.checkpoint.resume is not None:
            self._resume(resolve_resume(config.checkpoint.resume, self.out_dir))
        else:
            # Per-rank stream for dropout and anything else random during training.
            torch.manual_seed(config.seed + self.ctx.rank)

    # ------------------------------------------------------------------------- setup

    def _check_output_folder(self) -> None:
        resume = self.config.checkpoint.resume
        if resume is None and (
            list_checkpoints(self.out_dir) or (self.out_dir / METRICS_FILE).exists()
        ):
            raise ConfigError(
                f"output folder {self.out_dir} already holds a training run; pass --resume to "
                "continue it, or choose another --out"
            )

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
        saved = json.loads((path / "trainer" / "state.json").read_text(encoding="utf-8"))
        saved_data = saved.get("config", {}).get("data", {})
        for key in ("train_turns", "loss_mode", "batch_tokens", "shuffle"):
            now = getattr(self.config.data, key)
            if key in saved_data and saved_data[key] != now:
                raise ConfigError(
                    f"--resume: data.{key} is {now!r} but the checkpoint {path} was trained "
                    f"with {saved_data[key]!r}; resume with the same data settings"
                )
        if saved.get("config", {}).get("seed", self.config.seed) != self.config.seed:
            raise ConfigError(
                f"--resume: seed {self.config.seed} differs from the checkpoint's "
                f"{saved['config']['seed']}; the data order depends on it, use the same seed"
            )
        self.state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ctx)
        self.state.total_steps = self.total_steps
        self.state.world_size = self.ctx.world_size
        self.state.config = self.config.to_dict()
        self.resumed_from = path

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
        """Train to the end (or ``max_steps``); checkpoint periodically and at the end."""
        config, ctx = self.config, self.ctx
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
        progress.write(
            f"epoch {self.state.epoch}: {self.epoch_plan(self.state.epoch).stats.summary()}"
        )
        evaluation = TrainingEvaluation.create(config.eval, self.tokenizer, self.compute_dtype)
        throughput = Throughput()
        last_checkpoint: Path | None = None
        record: dict[str, Any] | None = None
        every = config.checkpoint.every_steps
        self.model.train()
        try:
            for epoch, step_batches, epoch_start in self._steps():
                record = self.train_step(step_batches)
                self.state.step += 1
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
                if every and self.state.step % every == 0 and self.state.step < self.total_steps:
                    last_checkpoint = self._save()
                if self.on_step_end is not None:
                    self.on_step_end(record)
            if self.state.step > 0:
                last_checkpoint = self._save()
        finally:
            progress.close()
            metrics.close()
        return TrainResult(self.state.step, last_checkpoint, record)

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
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        # The one host sync of the step.
        loss_value, grad_norm_value = torch.stack(
            [loss_sum, grad_norm.detach().float().reshape(())]
        ).tolist()
        _, tokens, trained, trajectories = counts.tolist()
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": int(tokens),
            "trained_tokens": int(trained),
            "trajectories": int(trajectories),
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
        )

    def _write_run_info(self) -> None:
        rs = self.rollouts
        plan = self.epoch_plan(0)
        info = {
            "config": self.config.to_dict(),
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
        tmp = self.out_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / RUN_FILE)


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


def _weighting_config(config: TrainConfig) -> WeightingConfig:
    given = {k: v for k, v in dataclasses.asdict(config.weighting).items() if v is not None}
    return WeightingConfig(**given)


def _load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, or None when the model folder/id has none (config-only
    models); the export then holds the model alone."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, KeyError):
        return None


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
