"""Checkpoints: a Hugging Face export for inference plus the trainer state for exact resume.

Layout of ``OUT/checkpoint-000120/``::

    model/                   the model alone, ready to upload or serve: save_pretrained
                             export (config.json, model.safetensors; LoRA runs:
                             adapter_config.json and adapter_model.safetensors, or the
                             merged model with checkpoint.merge_lora), tokenizer files and
                             a generated model card (README.md)
    trainer/state.json       data position (epoch, step, micro-batch cursor), run facts
    trainer/scheduler.pt     learning-rate scheduler state
    trainer/rng/rank00000.pt RNG states of each rank (torch, CUDA, Python, NumPy)
    trainer/dcp/             model and optimizer state, torch.distributed.checkpoint format

Model and optimizer state go through ``torch.distributed.checkpoint`` with the
``get_state_dict``/``set_state_dict`` helpers, so the same code saves one process, DDP
and FSDP2-sharded runs, and a checkpoint can be loaded on a different number of ranks.
Frozen parameters (the base model of a LoRA run) are left out: resume rebuilds them from
the base model. The export gathers a full (consolidated) state dict on the main rank.

Loading never runs code from the checkpoint: DCP's ``.metadata`` is read by an unpickler
that admits only DCP's own metadata types, its byte entries and the ``.pt`` files by
``torch.load(weights_only=True)``; anything else is refused with ``CheckpointError``.

A checkpoint is written into a hidden temporary folder and renamed into place when
complete, so a crash never leaves a half-written ``checkpoint-*`` folder. The last
``keep_last`` checkpoints are kept; an older one is first renamed to a hidden name and
then deleted, so a kill during the deletion never leaves a partial checkpoint that looks
complete. A checkpoint is never written from non-finite parameters.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from drift_engine.errors import CheckpointError, ConfigError, TrainingDivergedError
from drift_engine.models.sources import CHECKPOINT_MODEL_DIR
from drift_engine.train.distributed import (
    DistributedContext,
    all_reduce_sum_,
    barrier,
    full_model_state_dict,
    unwrap_model,
)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_DIR = "trainer"  # the trainer state inside checkpoint-N/, beside the model export
MODEL_CARD = "README.md"
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
    # steps skipped for a non-finite loss or gradient norm (no update applied)
    skipped_steps: int = 0
    # what was trained, for resume checks: see Trainer (empty in older checkpoints)
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    model_signature: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-NNNNNN`` folder."""
    match = _CHECKPOINT_RE.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a {CHECKPOINT_PREFIX}NNNNNN folder")
    return int(match.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for child in out_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / TRAINER_DIR / "state.json").is_file():
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
    if not (path / TRAINER_DIR / "state.json").is_file():
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
    model_card: str | None = None,
    merge_lora: bool = False,
) -> Path:
    """Write ``OUT/checkpoint-{step}`` atomically; every rank must call this.

    ``export_dtype`` casts the floating-point tensors of the Hugging Face export (e.g. to
    bfloat16 when training used float32 master weights); None keeps their dtype.
    ``model_card`` is written as ``model/README.md``; ``merge_lora`` exports a LoRA run as
    the merged model instead of the adapter. A checkpoint of the same step that already
    exists (left by an abandoned run) is replaced. Raises ``TrainingDivergedError``, and
    writes nothing, when a parameter is not finite.
    """
    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(state.step)
    tmp = out_dir / f".{final.name}.tmp"
    if not parameters_finite(model, ctx):
        latest = find_latest_checkpoint(out_dir)
        raise TrainingDivergedError(
            f"step {state.step}: the parameters are not finite (NaN or inf); no checkpoint "
            f"written. The last finite checkpoint is {latest or 'none (none was written)'}; "
            "lower the learning rate (--lr) or check the data's weights, then resume from it"
        )
    if ctx.is_main:
        _remove_leftovers(out_dir)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a run killed while saving
        (tmp / TRAINER_DIR / "rng").mkdir(parents=True)
    barrier(ctx)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    with _quiet_single_process():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(tmp / TRAINER_DIR / "dcp"),
            no_dist=not ctx.is_distributed,
        )
    torch.save(_rng_state(), tmp / TRAINER_DIR / "rng" / f"rank{ctx.rank:05d}.pt")

    # Consolidated export: a collective under FSDP, materialised on the main rank only.
    full_sd = full_model_state_dict(model, ctx)
    if ctx.is_main:
        export = tmp / CHECKPOINT_MODEL_DIR
        _export_pretrained(model, full_sd, export, export_dtype, merge_lora=merge_lora)
        if tokenizer is not None:
            tokenizer.save_pretrained(export)
        if model_card is not None:
            (export / MODEL_CARD).write_text(model_card, encoding="utf-8")
        torch.save(scheduler.state_dict(), tmp / TRAINER_DIR / "scheduler.pt")
        _write_json(tmp / TRAINER_DIR / "state.json", asdict(state))
    del full_sd
    barrier(ctx)

    if ctx.is_main:
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            remove_checkpoint(old)
    barrier(ctx)
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first (so that it no longer
    counts as a checkpoint even if the deletion is interrupted), then removed."""
    trash = path.with_name(f".{path.name}.deleting")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash)


def _remove_leftovers(out_dir: Path) -> None:
    """Hidden folders of interrupted deletions (``.checkpoint-N.deleting``)."""
    for child in out_dir.glob(f".{CHECKPOINT_PREFIX}*.deleting"):
        shutil.rmtree(child, ignore_errors=True)


def parameters_finite(model: torch.nn.Module, ctx: DistributedContext) -> bool:
    """True when every parameter of ``model`` (on every rank) is finite. One host sync."""
    flags = []
    for param in model.parameters():
        local = param.detach()
        if isinstance(local, DTensor):
            local = local.to_local()
        if local.numel():
            flags.append(torch.isfinite(local).all())
    bad = torch.zeros((), dtype=torch.float32, device=ctx.device)
    if flags:
        bad = (~torch.stack(flags)).sum().to(torch.float32)
    all_reduce_sum_(bad, ctx)
    return float(bad) == 0.0


def _export_pretrained(
    model: torch.nn.Module,
    full_sd: dict[str, torch.Tensor],
    path: Path,
    dtype: torch.dtype | None,
    *,
    merge_lora: bool = False,
) -> None:
    hf_model = unwrap_model(model)
    if merge_lora and hasattr(hf_model, "peft_config"):
        full_sd = _merged_lora_state_dict(hf_model, full_sd)
        hf_model = hf_model.get_base_model()
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


def _merged_lora_state_dict(
    peft_model: torch.nn.Module, full_sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA layer's update folded into its weight,
    W + scaling · B·A, computed from ``full_sd`` (the peft model's consolidated state);
    the live model is left untouched (merging in place and back would change it)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            a = full_sd.get(f"{name}.lora_A.{adapter}.weight")
            b = full_sd.get(f"{name}.lora_B.{adapter}.weight")
            if a is None or b is None:
                continue
            delta = (b.double() @ a.double()) * float(module.scaling[adapter])
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            key = f"{name}.base_layer.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    for key, tensor in full_sd.items():
        if ".lora_" in key:
            continue
        if key in deltas:
            tensor = (tensor.double() + deltas[key]).to(tensor.dtype)
        merged[key.removeprefix(prefix).replace(".base_layer.", ".")] = tensor
    return merged


# ----------------------------------------------------------------------------- load


def read_trainer_state(path: str | Path) -> TrainerState:
    """``path/trainer/state.json`` (JSON only: nothing is executed)."""
    state_file = Path(path) / TRAINER_DIR / "state.json"
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"cannot read trainer state {state_file}: {err}; the checkpoint is incomplete or "
            "corrupt, resume from another one (--resume DIR)"
        ) from None
    if raw.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file} has trainer-state format {raw.get('format_version')!r}; this "
            f"version of drift-engine reads format {STATE_FORMAT_VERSION}"
        )
    known = {f.name for f in fields(TrainerState)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(
            f"{state_file} has unknown fields {unknown}; it was written by another version "
            "of drift-engine"
        )
    return TrainerState(**raw)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: DistributedContext,
) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the trainer state.

    Works across rank counts: DCP reshards the model and optimizer; a rank without its own
    RNG file (more ranks than when saved) takes rank 0's. Nothing from the checkpoint is
    executed (see the module docstring); a corrupt, truncated or unsafe checkpoint raises
    ``CheckpointError``.
    """
    path = Path(path)
    state = read_trainer_state(path)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    bundle = {"model": model_sd, "optim": optim_sd}
    dcp_dir = path / TRAINER_DIR / "dcp"
    reader = _SafeFileSystemReader(str(dcp_dir))
    try:
        reader.read_metadata()  # first on its own, for a clear error (dcp.load rereads it)
        with _quiet_single_process():
            dcp.load(
                bundle,
                storage_reader=reader,
                planner=_SafeLoadPlanner(),
                no_dist=not ctx.is_distributed,
            )
    except (CheckpointException, Exception) as err:
        raise _load_error(dcp_dir, err) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=bundle["model"],
        optim_state_dict=bundle["optim"],
        options=_DCP_OPTIONS,
    )
    scheduler.load_state_dict(_torch_load(path / TRAINER_DIR / "scheduler.pt"))

    rng_file = path / TRAINER_DIR / "rng" / f"rank{ctx.rank:05d}.pt"
    if not rng_file.exists():
        rng_file = path / TRAINER_DIR / "rng" / f"rank{0:05d}.pt"
    try:
        _set_rng_state(_torch_load(rng_file))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{rng_file} does not hold RNG states ({err})") from None
    return state


# Globals that DCP's metadata pickle may name: its own dataclasses and the torch types in
# them (dtype, layout, memory format, Size), and the path it records.
_DCP_META = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *(
        (_DCP_META, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(
        (module, name)
        for module in ("pathlib", "pathlib._local")
        for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
    ),
}


class _UnsafeCheckpoint(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global outside ``_SAFE_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _SAFE_GLOBALS or (
            module == "torch"
            and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
            )
        )
        if not allowed:
            raise _UnsafeCheckpoint(f"it names {module}.{name}, which is not a DCP metadata type")
        return super().find_class(module, name)


class _SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata_path = Path(self.path) / ".metadata"
        if hasattr(self, "_get_metadata_path"):
            metadata_path = Path(self._get_metadata_path(kwargs.get("rank")))
        with open(metadata_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise _UnsafeCheckpoint(f"it holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(default_planner.DefaultLoadPlanner):
    """DCP's default load planner with byte entries read by ``torch.load(weights_only=True)``
    (the default reads them with full pickle)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            default_planner.set_element(
                self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj
            )
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values "
            f"({str(err).splitlines()[0]}); only load checkpoints you trust"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "the checkpoint is incomplete or corrupt, resume from another one (--resume DIR)"
        ) from None


def _load_error(dcp_dir: Path, err: BaseException) -> CheckpointError:
    """One line for a failed ``dcp.load``: unsafe content, or a corrupt/mismatched checkpoint."""
    causes: list[BaseException] = [err]
    if isinstance(err, CheckpointException):
        causes = [exc for exc, _ in err.failures.values()] or causes
    cause = causes[0]
    first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
    if isinstance(cause, pickle.UnpicklingError):
        return CheckpointError(
            f"refusing to load {dcp_dir}: {first_line}; the checkpoint was not written by "
            "drift-engine or was altered, and nothing in it was run. Only resume from "
            "checkpoints you trust"
        )
    return CheckpointError(
        f"cannot load {dcp_dir} ({type(cause).__name__}: {first_line}); the checkpoint is "
        "incomplete or corrupt, or was written for another model: resume from another "
        "checkpoint (--resume DIR) with the --model the run was started with"
    )


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it assumes a single process even when told so with no_dist=True, and
    # logs tracebacks of the errors it then raises (reported here as one line instead).
    dcp_logger = logging.getLogger("torch.distributed.checkpoint")
    level = dcp_logger.level
    dcp_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        dcp_logger.setLevel(level)


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


def drop_trainer_states(out_dir: str | Path) -> int:
    """Delete the trainer state (``checkpoint-N/trainer/``, what resume reads: optimizer
    moments, RNG, data position) of every checkpoint in ``out_dir``, keeping the model
    exports; for a finished run that will not be resumed. Returns the bytes freed."""
    freed = 0
    for state in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*/{TRAINER_DIR}"):
        freed += sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
        shutil.rmtree(state)
    return freed
