"""torchrun worker of tests/test_distributed.py: DDP and FSDP2 against one process.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_workers/train_worker.py \
        --out DIR --resume-from CKPT

For each strategy (fsdp, ddp) and untied/tied embeddings: the whole gradient of the first
step, then ``STEPS`` optimizer steps on the global batches of dist_common; and, on every
rank, the same in-process without any distribution (the reference). Rank 0 writes both
runs' gradients, losses, grad norms and final parameters to DIR/results.pt for the test to
compare. Also saves a DCP checkpoint of the
FSDP2 (untied) run after two steps (DIR/fsdp-step2) and resumes the one-process checkpoint
CKPT (two steps done) on 2 ranks for one more step.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from dist_common import (
    SINGLE,
    accumulate_gradients,
    build_model,
    build_optimizer,
    train_single,
    train_step,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from drift_engine.train.distributed import (
    DistributedContext,
    barrier,
    destroy_distributed,
    full_model_state_dict,
    init_distributed,
    prepare_model,
    unwrap_model,
)

STEPS = 3


def save(model, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load(model, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    dcp.load(bundle, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"]
    )


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (FSDP2 shards gathered), by Hugging Face name."""
    grads = {}
    for name, param in unwrap_model(model).named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    return grads


def first_step_gradients(model: torch.nn.Module, ctx: DistributedContext) -> dict:
    accumulate_gradients(model, 0, ctx)
    grads = full_gradients(model)
    model.zero_grad(set_to_none=True)
    return grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-from", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    base = init_distributed("auto", device="cpu")
    assert base.world_size == 2 and base.backend == "gloo" and base.strategy == "ddp", base
    results = {}
    for strategy in ("fsdp", "ddp"):
        ctx = dataclasses.replace(base, strategy=strategy)
        for tied in (False, True):
            reference = build_model(tied)
            ref_losses, ref_norms = train_single(
                reference, build_optimizer(reference), range(STEPS)
            )

            model = prepare_model(build_model(tied), ctx)
            grads = first_step_gradients(model, ctx)
            ref_grads = first_step_gradients(build_model(tied), SINGLE)
            optimizer = build_optimizer(model)
            losses, norms = [], []
            for step in range(STEPS):
                if step == 2 and strategy == "fsdp" and not tied:
                    save(model, optimizer, args.out / "fsdp-step2")
                loss, norm = train_step(model, optimizer, step, ctx)
                losses.append(loss)
                norms.append(norm)
            results[f"{strategy}-{'tied' if tied else 'untied'}"] = {
                "losses": losses,
                "ref_losses": ref_losses,
                "norms": norms,
                "ref_norms": ref_norms,
                "grads": grads,
                "ref_grads": ref_grads,
                "params": full_model_state_dict(model, ctx),
                "ref_params": {k: v.clone() for k, v in reference.state_dict().items()},
            }

        # Resume the one-process checkpoint (two steps done) on two ranks, one more step.
        model = prepare_model(build_model(tied=False, seed=1), ctx)
        optimizer = build_optimizer(model)
        load(model, optimizer, args.resume_from)
        loss, norm = train_step(model, optimizer, 2, ctx)
        results[f"{strategy}-resumed"] = {
            "losses": [loss],
            "norms": [norm],
            "params": full_model_state_dict(model, ctx),
        }
    if base.is_main:
        torch.save(results, args.out / "results.pt")
    barrier(base)
    destroy_distributed(base)


if __name__ == "__main__":
    main()
