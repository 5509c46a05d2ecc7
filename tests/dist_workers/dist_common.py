"""Model, data and training step shared by the distributed tests and their torchrun worker.

The same ``train_step`` runs in one process (strategy "none") and under torchrun (DDP,
FSDP2): everything rank-dependent goes through drift_engine.train.distributed.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from drift_engine.data.packing import IGNORE_INDEX, PackedBatch
from drift_engine.models import weighted_sft_loss
from drift_engine.train.distributed import (
    DistributedContext,
    all_reduce_sum_,
    clip_grad_norm_,
    gradient_sync,
    run_forward,
    shard_micro_batches,
)

VOCAB = 97  # prime: no block size divides it
HIDDEN = 32
MAX_NORM = 0.5  # small enough to clip in these tests, so clipping is exercised
LR = 1e-2
# Micro-batches per step: 5 and 3 do not divide by 2 ranks, so padding micro-batches run.
STEP_SIZES = (4, 5, 3)
SINGLE = DistributedContext(0, 1, 0, torch.device("cpu"), "none", None)


def build_model(tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    if not tied:  # distinct LM head, so a wrongly tied/untied gradient shows
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.05)
    return model


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def trajectory(
    length: int, trained: int, weight: float, index: int, gen: torch.Generator
) -> PackedBatch:
    """One trajectory as a micro-batch: its last ``trained`` next-token targets are trained,
    each with coefficient weight / trained (token-mean loss times importance weight)."""
    ids = torch.randint(0, VOCAB, (length,), generator=gen)
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.int64)
    labels[length - 1 - trained : length - 1] = ids[length - trained :]
    token_weights = torch.where(labels != IGNORE_INDEX, weight / trained, 0.0).float()
    return PackedBatch(
        input_ids=ids.view(1, -1),
        position_ids=torch.arange(length).view(1, -1),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
        max_seqlen=length,
        labels=labels,
        token_weights=token_weights,
        trajectory_index=torch.tensor([index]),
        trajectory_weights=torch.tensor([weight]),
        num_trajectories=1,
        num_tokens=length,
        num_trained_tokens=trained,
    )


def global_batches(step: int) -> list[PackedBatch]:
    """The micro-batches of optimizer step ``step`` (same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    batches = []
    for i in range(STEP_SIZES[step % len(STEP_SIZES)]):
        length = int(torch.randint(8, 40, (), generator=gen))
        trained = int(torch.randint(2, length // 2, (), generator=gen))
        weight = float(torch.empty(()).uniform_(0.2, 2.0, generator=gen))
        batches.append(trajectory(length, trained, weight, 100 * step + i, gen))
    return batches


def micro_batch_loss(
    model: Qwen2ForCausalLM, batch: PackedBatch, normalizer: torch.Tensor
) -> torch.Tensor:
    """The trainer's loss: Σ token_weight·CE / the step's global trajectory count, with the
    fused loss on the LM-head weight (read outside the model's own forward)."""
    return weighted_sft_loss(model, batch, normalizer, impl="torch")


def accumulate_gradients(
    model: torch.nn.Module, step: int, ctx: DistributedContext
) -> torch.Tensor:
    """Forward and backward of every micro-batch of ``global_batches(step)`` this rank owns;
    returns the step's loss (summed over ranks)."""
    local = shard_micro_batches(global_batches(step), ctx)
    normalizer = torch.tensor(float(sum(b.num_trajectories for b in local)), device=ctx.device)
    all_reduce_sum_(normalizer, ctx)
    # DDP and FSDP2 average gradients over ranks; the loss is already normalised globally.
    scale = float(ctx.world_size)
    loss_sum = torch.zeros((), device=ctx.device)
    for i, batch in enumerate(local):
        with gradient_sync(model, ctx, last_micro_batch=i == len(local) - 1):
            loss = run_forward(model, partial(micro_batch_loss, batch=batch, normalizer=normalizer))
            (loss * scale).backward()
        loss_sum += loss.detach()
    return all_reduce_sum_(loss_sum, ctx)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, ctx: DistributedContext
) -> tuple[float, float]:
    """One optimizer step on ``global_batches(step)``; returns (loss, grad norm)."""
    loss = accumulate_gradients(model, step, ctx)
    grad_norm = clip_grad_norm_(model, MAX_NORM, ctx)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss), float(grad_norm)


def train_single(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range
) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for step in steps:
        loss, norm = train_step(model, optimizer, step, SINGLE)
        losses.append(loss)
        norms.append(norm)
    return losses, norms
