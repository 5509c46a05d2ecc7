"""Checkpoints: a Hugging Face export for inference plus the trainer state for exact resume.

Layout of ``OUT/checkpoint-000120/``::

    config.json, model.safetensors, tokenizer files    save_pretrained export (LoRA runs:
                                                       adapter_config.json and
                                                       adapter_model.safetensors)
    trainer/state.json       data position (epoch, step, micro-batch cursor), run facts
    trainer/scheduler.pt     learning-rate scheduler state
    trainer/rng/rank00000.pt RNG states of each rank (torch, CUDA, Python, NumPy)
    trainer/dcp/             model and optimizer state, torch.distributed.checkpoint format

Model and optimizer state go through ``torch.distributed.checkpoint`` with the
``get_state_dict``/``set_state_dict`` helpers, so the same code saves one process, DDP
and FSDP2-sharded runs, and a checkpoint can be loaded on a different number of ranks.
Frozen parameters (the base model of a LoRA run) are left out: resume rebuilds them from
the base model. The export gathers a full (consolidated) state dict on the main rank.

A checkpoint is written into a hidden temporary folder and renamed into place when
complete, so a crash never leaves a half-written ``checkpoint-*`` folder; the last
``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from drift_engine.errors import ConfigError
from drift_engine.train.distributed import (
    DistributedContext,
    barrier,
    full_model_state_dict,
    unwrap_model,
)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FORMAT_VERSION = 1
# Trainable state only; strict=False lets the load skip the frozen parameters it left out
# (a trainable one missing from the checkpoint still fails in dcp.load).
_DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass
class TrainerState:
    """Where training stands after ``step`` optimizer steps."""

    step: int = 0
    # epoch of the next optimizer step (0-based) and the index, in that epoch's
    # micro-batch plan, of the next step's first micro-batch
    epoch: int = 0
    micro_batch_cursor: int = 0
    total_steps: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    format_version: int = STATE_FORMAT_VERSION
    # the configuration the run was started with (for the record and resume checks)
    config: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for child in out_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / "trainer" / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(out_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """The checkpoint folder that ``resume`` ("latest" or a path) designates."""
    if resume == "latest":
        latest = find_latest_checkpoint(out_dir)
        if latest is None:
            raise ConfigError(
                f"--resume: no checkpoint found in {out_dir}; start without --resume, or "
                "pass the checkpoint folder to resume from"
            )
        return latest
    path = Path(resume)
    if not (path / "trainer" / "state.json").is_file():
        raise ConfigError(
            f"--resume {resume}: not a trainer checkpoint (no trainer/state.json inside); "
            f"pass a {CHECKPOINT_PREFIX}NNNNNN folder or 'latest'"
        )
    return path


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    out_dir: str | Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistributedContext,
    *,
    tokenizer: Any = None,
    export_dtype: torch.dtype | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``OUT/checkpoint-{step}`` atomically; every rank must call this.

    ``export_dtype`` casts the floating-point tensors of the Hugging Face export (e.g. to
    bfloat16 when training used float32 master weights); None keeps their dtype.
    """
    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(state.step)
    tmp = out_dir / f".{final.name}.tmp"
    if final.exists():  # already saved at this step (e.g. periodic save == final save)
        return final
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a run killed while saving
        (tmp / "trainer" / "rng").mkdir(parents=True)
    barrier(ctx)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    with _quiet_single_process():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(tmp / "trainer" / "dcp"),
            no_dist=not ctx.is_distributed,
        )
    torch.save(_rng_state(), tmp / "trainer" / "rng" / f"rank{ctx.rank:05d}.pt")

    # Consolidated export: a collective under FSDP, materialised on the main rank only.
    full_sd = full_model_state_dict(model, ctx)
    if ctx.is_main:
        _export_pretrained(model, full_sd, tmp, export_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "trainer" / "scheduler.pt")
        _write_json(tmp / "trainer" / "state.json", asdict(state))
    del full_sd
    barrier(ctx)

    if ctx.is_main:
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def _export_pretrained(
    model: torch.nn.Module, full_sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None
) -> None:
    hf_model = unwrap_model(model)
    if dtype is not None:
        cast: dict[int, torch.Tensor] = {}  # keep tied tensors tied after the cast
        for key, tensor in full_sd.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                ptr = tensor.data_ptr()
                if ptr not in cast:
                    cast[ptr] = tensor.to(dtype)
                full_sd[key] = cast[ptr]
    hf_model.save_pretrained(path, state_dict=full_sd)
    config = getattr(hf_model, "config", None)
    if dtype is not None and config is not None and (path / "config.json").exists():
        # Record the export dtype so dtype="auto" loaders (vLLM, transformers) use it.
        config = copy.deepcopy(config)
        config.dtype = dtype
        config.save_pretrained(path)


# ----------------------------------------------------------------------------- load


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistributedContext,
) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the trainer state.

    Works across rank counts: DCP reshards the model and optimizer; a rank without its own
    RNG file (more ranks than when saved) takes rank 0's.
    """
    path = Path(path)
    state_file = path / "trainer" / "state.json"
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read trainer state {state_file}: {err}") from None
    if raw.get("format_version") != STATE_FORMAT_VERSION:
        raise ConfigError(
            f"{state_file} has trainer-state format {raw.get('format_version')!r}; this "
            f"version of drift-engine reads format {STATE_FORMAT_VERSION}"
        )
    state = TrainerState(**raw)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    bundle = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(
            bundle, checkpoint_id=str(path / "trainer" / "dcp"), no_dist=not ctx.is_distributed
        )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=bundle["model"],
        optim_state_dict=bundle["optim"],
        options=_DCP_OPTIONS,
    )
    scheduler.load_state_dict(torch.load(path / "trainer" / "scheduler.pt", weights_only=True))

    rng_file = path / "trainer" / "rng" / f"rank{ctx.rank:05d}.pt"
    if not rng_file.exists():
        rng_file = path / "trainer" / "rng" / f"rank{0:05d}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes a single process even when told so with no_dist=True.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # (name, key array, pos, has_gauss, cached_gaussian); the array as a tensor so the
        # file loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
