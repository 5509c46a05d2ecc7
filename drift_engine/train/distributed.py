"""Multi-process training on PyTorch's own engine: torchrun, FSDP2 ``fully_shard``, DDP.

One process per device, launched by ``torchrun`` (``python -m torch.distributed.run``),
which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. The pieces, in the order a
trainer uses them::

    ctx = init_distributed("auto")                  # process group, device, strategy
    model = prepare_model(model, ctx, mixed_precision=torch.bfloat16)
    local = shard_micro_batches(step_batches, ctx)  # this rank's share of the step
    for i, batch in enumerate(local):
        with gradient_sync(model, ctx, last_micro_batch=i == len(local) - 1):
            loss = run_forward(model, lambda m: loss_fn(m, batch))
            loss.backward()
    grad_norm = clip_grad_norm_(model, max_norm, ctx)
    optimizer.step()
    destroy_distributed(ctx)

Strategies:

- ``"none"``: one process, the model unchanged.
- ``"ddp"``: ``DistributedDataParallel``; every rank holds the whole model, gradients are
  all-reduced (averaged) once per optimizer step.
- ``"fsdp"``: FSDP2 (``fully_shard``) on each decoder layer and then on the root, so the
  embeddings, final norm and LM head form the root's group; parameters, gradients and
  optimizer state are sharded over ranks; gradients are reduce-scattered (averaged) in
  fp32 after each micro-batch's backward.

Both DDP and FSDP2 *average* gradients over ranks. A loss normalised by a count summed
over all ranks (the DRIFT step loss) must therefore be multiplied by ``world_size`` before
``backward`` for the reduced gradient to be the gradient of the global loss.

The fused loss reads the LM-head weight outside the model's own ``forward`` (the model
returns hidden states; the loss multiplies them with the weight). Under FSDP2 that weight
is a sharded ``DTensor`` except while the root module is inside its forward, so the loss
must be computed by :func:`run_forward`; see its docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from drift_engine.errors import ConfigError
from drift_engine.kernels.labels import IGNORE_INDEX
from drift_engine.launch import torchrun_env
from drift_engine.models.layers import decoder_layers
from drift_engine.models.loss import call_as_forward

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older location of FSDP2
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )
from torch.distributed.tensor import DTensor

STRATEGIES = ("auto", "none", "ddp", "fsdp")

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    ``strategy`` is the resolved one ("none" for a single process, otherwise "ddp" or
    "fsdp"); ``backend`` is the process-group backend ("nccl", "gloo") or None without a
    process group.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on the rank that writes logs, metrics and exports (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------- setup


def init_distributed(
    strategy: str = "auto", device: torch.device | str | None = None
) -> DistributedContext:
    """Join the torchrun job described by the environment and pick the device.

    Without torchrun (or with ``WORLD_SIZE=1``) no process group is created and the
    strategy is "none" whatever was asked. With several processes: NCCL on CUDA (each
    process on ``cuda:LOCAL_RANK``), gloo on CPU; "auto" means "fsdp" on CUDA and "ddp" on
    CPU. ``device`` None picks CUDA when available, else CPU; a CUDA device's index is
    replaced by the local rank.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    env = torchrun_env()
    world_size, rank = env.world_size, env.rank
    local_rank = env.local_rank if env.local_rank is not None else 0

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use 'cpu'")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} CUDA "
                "devices are visible; start at most that many processes per node "
                "(torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    if world_size == 1:
        return DistributedContext(0, 1, 0, device, "none", None)
    if strategy == "none":
        raise ConfigError(
            f"strategy 'none' trains in one process, but torchrun started {world_size}; "
            "use strategy 'ddp' or 'fsdp' (or 'auto'), or launch a single process"
        )
    if strategy == "auto":
        strategy = "fsdp" if device.type == "cuda" else "ddp"

    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        backend = dist.get_backend()
    else:
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ConfigError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
            f"match RANK={rank}, WORLD_SIZE={world_size}; launch with torchrun"
        )
    return DistributedContext(rank, world_size, local_rank, device, strategy, backend)


def destroy_distributed(ctx: DistributedContext) -> None:
    """Tear down the process group created by :func:`init_distributed` (if any)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model


def prepare_model(
    model: nn.Module,
    ctx: DistributedContext,
    *,
    mixed_precision: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Wrap ``model`` for ``ctx.strategy``; returns the module to train.

    - "none": ``model`` itself.
    - "ddp": ``DistributedDataParallel(model)``; the Hugging Face model is ``.module``
      (see :func:`unwrap_model`). ``mixed_precision`` does not apply: use a bf16 model or
      ``torch.autocast`` as on one device.
    - "fsdp": ``model`` itself, sharded in place by FSDP2: ``fully_shard`` on every decoder
      layer, then on the root (whose group holds the embeddings, the final norm and the LM
      head, so tied embeddings stay one parameter). ``mixed_precision`` is the dtype the
      parameters are all-gathered and computed in; the sharded parameters (and so the
      optimizer) stay in the model's dtype and gradients are reduce-scattered in fp32.
      ``reshard_after_forward`` frees each layer's gathered parameters after its forward
      (ZeRO-3; gathered again in backward); False keeps them until backward (ZeRO-2-like:
      less communication, more memory).

    Create the optimizer after this call, from the returned module's parameters. Compute
    the loss with :func:`run_forward`.
    """
    if ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        model.to(ctx.device)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if ctx.strategy != "fsdp":
        raise ConfigError(f"unknown strategy {ctx.strategy!r}; expected 'none', 'ddp' or 'fsdp'")

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    # Innermost first: a block nested in another must be its own unit before its parent is.
    for layer in reversed(decoder_layers(model)):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are kept gathered from its forward to its backward by FSDP2.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def run_forward(model: nn.Module, fn: Callable[[nn.Module], T]) -> T:
    """Call ``fn(m)`` as the forward pass of the prepared ``model``; return its result.

    ``m`` is the unwrapped model (the Hugging Face module). Use it to compute a loss that
    reads parameters outside the model's own ``forward``, such as the fused loss on the
    LM-head weight (tied or not)::

        loss = run_forward(model, lambda m: weighted_sft_loss(m, batch, normalizer))
        loss.backward()

    Why: under FSDP2 the root's parameters (embeddings, final norm, LM head) are sharded
    ``DTensor`` objects except between the root's pre-forward hook (which all-gathers them)
    and its backward (which reduce-scatters their gradients). Running ``fn`` as the root's
    forward puts the loss inside that window: ``m.lm_head.weight`` is then the full
    (unsharded) weight in the compute dtype, the loss's gradient accumulates into it, and
    FSDP2 reduce-scatters it to the shards with the rest of the root's group. (Calling
    ``weight.full_tensor()`` instead would give each shard only its own rank's gradient,
    unreduced; calling the inner ``m.model`` directly would skip the root's hooks.) Under
    DDP the same call goes through ``DistributedDataParallel.forward``, which arms the
    gradient all-reduce for the following backward. With one process this is ``fn(model)``.

    Pass tensors to ``fn`` through the closure, not as arguments: FSDP2 would cast
    floating-point forward arguments to the compute dtype.
    """
    inner = unwrap_model(model)
    if inner is model and not isinstance(model, FSDPModule):
        return fn(model)
    return call_as_forward(model, inner, fn)


@contextlib.contextmanager
def gradient_sync(
    model: nn.Module, ctx: DistributedContext, *, last_micro_batch: bool
) -> Iterator[None]:
    """Context for one micro-batch's forward and backward under gradient accumulation.

    DDP: the all-reduce is skipped (``no_sync``) on every micro-batch but the step's last.
    FSDP2: gradients are reduce-scattered after every micro-batch (overlapped with the
    backward); skipping it would keep the unsharded fp32 gradients of the whole model on
    every rank until the last micro-batch. One process: nothing to do.
    """
    if ctx.strategy == "ddp" and not last_micro_batch:
        with model.no_sync():
            yield
    else:
        yield


# ----------------------------------------------------------------------------- data


def shard_micro_batches(
    step_batches: Sequence[T],
    ctx: DistributedContext,
    *,
    num_tokens: Callable[[T], int] | None = None,
    padding: Callable[[T], T] | None = None,
) -> list[T]:
    """This rank's share of one optimizer step's micro-batches, balanced by tokens.

    Deterministic and computed identically on every rank without communication: the
    micro-batches are taken longest first (ties by position) and each goes to the rank
    with the fewest tokens so far among those holding fewer than ``ceil(n / world_size)``
    micro-batches (greedy longest-processing-time with a count cap). Each rank's list is in
    that longest-first order, so the k-th micro-batches of all ranks have similar sizes:
    FSDP2 runs the ranks in lockstep, layer by layer, so a step costs about the sum over k
    of the largest k-th micro-batch.

    Every rank gets the same number of micro-batches (each forward/backward is a set of
    collectives that all ranks must issue). Ranks short of the count get padding
    micro-batches, ``padding(smallest micro-batch of the step)``; the default
    :func:`padding_micro_batch` makes a copy of a ``PackedBatch`` that trains nothing.

    ``num_tokens(item)`` gives an item's size; by default its ``num_tokens`` attribute.
    With one process the list is returned unchanged.
    """
    if not ctx.is_distributed:
        return list(step_batches)
    if not step_batches:
        return []
    size_of = num_tokens if num_tokens is not None else _num_tokens_attribute
    sizes = [int(size_of(b)) for b in step_batches]
    world = ctx.world_size
    cap = -(-len(step_batches) // world)

    order = sorted(range(len(step_batches)), key=lambda i: (-sizes[i], i))
    loads = [0] * world
    assigned: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        rank = min((r for r in range(world) if len(assigned[r]) < cap), key=lambda r: (loads[r], r))
        assigned[rank].append(i)
        loads[rank] += sizes[i]

    mine = [step_batches[i] for i in assigned[ctx.rank]]
    missing = cap - len(mine)
    if missing:
        make_padding = padding if padding is not None else padding_micro_batch
        filler = make_padding(step_batches[order[-1]])
        mine.extend([filler] * missing)
    return mine


def _num_tokens_attribute(item: Any) -> int:
    try:
        return item.num_tokens
    except AttributeError:
        raise TypeError(
            f"shard_micro_batches: {type(item).__name__} has no num_tokens; pass "
            "num_tokens=<callable giving an item's token count>"
        ) from None


def padding_micro_batch(batch: T) -> T:
    """A copy of the ``PackedBatch`` ``batch`` that trains nothing.

    Same tokens, positions and sequence boundaries, so its forward and backward run the
    same layers and collectives as a real micro-batch; but every label is ignored
    (``-100``), every token weight is 0, it holds no trajectory (``trajectory_index`` and
    ``trajectory_weights`` are empty) and all its counts are 0. Its loss is an exact 0 and
    every parameter receives a zero gradient, and it adds nothing to a step's normaliser or
    token counts.
    """
    if not dataclasses.is_dataclass(batch):
        raise TypeError(
            f"padding_micro_batch expects a PackedBatch, got {type(batch).__name__}; pass "
            "shard_micro_batches(..., padding=<callable>) for other micro-batch types"
        )
    changes: dict[str, Any] = {
        "labels": torch.full_like(batch.labels, IGNORE_INDEX),
        "token_weights": torch.zeros_like(batch.token_weights),
        "num_trajectories": 0,
        "num_tokens": 0,
        "num_trained_tokens": 0,
    }
    for name in ("trajectory_index", "trajectory_weights"):
        if hasattr(batch, name):
            changes[name] = getattr(batch, name)[:0]
    return dataclasses.replace(batch, **changes)


def is_padding_micro_batch(batch: Any) -> bool:
    """True for a micro-batch made by :func:`padding_micro_batch`."""
    return batch.num_trajectories == 0 and batch.num_tokens == 0


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (asynchronously on the device: no host sync);
    returns it. With one process, returns it unchanged."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op with one process)."""
    if not ctx.is_distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def clip_grad_norm_(
    model: nn.Module, max_norm: float, ctx: DistributedContext, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the gradients of ``model`` to a total norm of ``max_norm``; return the total norm
    before clipping, as a 0-dim tensor on the device (no host sync).

    The norm is that of the whole model's gradient: under FSDP2 each rank holds shards
    (``DTensor``), whose local norms are combined across ranks; under DDP the gradients are
    already all-reduced and identical on every rank. ``max_norm`` of ``inf`` only measures.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=ctx.device)
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the per-shard partial norms, reduced over ranks
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------- state


def full_model_state_dict(model: nn.Module, ctx: DistributedContext) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded) state dict of ``model``, on CPU, on the main rank; ``{}``
    on the others. Keys are the Hugging Face ones (no DDP/FSDP prefixes). Every rank must
    call it: under FSDP2 it all-gathers each parameter.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not ctx.is_distributed:
        return {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state if ctx.is_main else {}


__all__ = [
    "STRATEGIES",
    "DistributedContext",
    "all_reduce_sum_",
    "barrier",
    "clip_grad_norm_",
    "destroy_distributed",
    "full_model_state_dict",
    "gradient_sync",
    "init_distributed",
    "is_padding_micro_batch",
    "padding_micro_batch",
    "prepare_model",
    "run_forward",
    "shard_micro_batches",
    "unwrap_model",
]
