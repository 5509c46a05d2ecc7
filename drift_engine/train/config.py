"""Typed configuration of the weighted-SFT trainer: the single source of truth.

A ``TrainConfig`` is built from defaults, then a TOML file (``load_config``), then command
line overrides (``apply_overrides``), and finally checked as a whole (``validate``). The
TOML file mirrors the dataclasses: top-level keys of ``TrainConfig`` plus one table per
section::

    out = "runs/drift"
    seed = 0

    [data]
    path = "rollouts.safetensors"
    batch_tokens = 16384

    [optim]
    lr = 5e-6

Unknown keys and values of the wrong type raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from drift_engine.errors import ConfigError

import tomllib

TrainTurns = Literal["last", "all"]
LossMode = Literal["trajectory", "weighted", "token"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
ScheduleName = Literal["constant_with_warmup", "cosine"]
Strategy = Literal["auto", "none", "ddp", "fsdp"]


@dataclass
class DataConfig:
    """What is trained on and how it is batched."""

    # rollouts.safetensors file, one of its shards, or a directory of shards
    path: str = ""
    # "last": only the last assistant turn of each trajectory is trained (DRIFT default);
    # "all": every assistant turn
    train_turns: TrainTurns = "last"
    # Step loss: "trajectory" = mean over the step's trajectories of w_i * token-mean CE_i
    # (DRIFT default); "weighted" = sum w_i * CE_i / sum w_i; "token" = weighted token mean.
    loss_mode: LossMode = "trajectory"
    # token budget of one packed micro-batch (also the longest trajectory that is kept
    # whole; longer ones are truncated from the left)
    batch_tokens: int = 16384
    # micro-batches per optimizer step on each rank
    grad_accum: int = 1
    epochs: int = 1
    # stop after this many optimizer steps (None: run all epochs)
    max_steps: int | None = None
    # shuffle the packed micro-batches each epoch (deterministic given the seed)
    shuffle: bool = True
    # compare the tokenizer recorded in the rollouts with the model's (false: skip the
    # check, e.g. for a model folder without tokenizer files; recorded in run.json)
    check_tokenizer: bool = True


@dataclass
class WeightingSection:
    """DRIFT importance weights. All None: use the file's stored weights when present,
    else compute them with the library defaults. Any value given recomputes the weights
    from the stored rewards."""

    gamma: float | None = None
    beta: float | None = None
    clip_max: float | None = None

    @property
    def overrides(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclass
class EvalSection:
    """multi@k of the model being trained on held-out problems (off while problems is "")."""

    # JSONL problem file (or hf:NAME) and the environment that checks the answers
    # (a built-in name or package.module:Class, with its default options)
    problems: str = ""
    env: str = ""
    # evaluate every this many optimizer steps, and after the last step
    every_steps: int = 100
    max_turns: int = 5
    max_new_tokens: int = 512
    # evaluate the first this many problems (None: all)
    limit: int | None = None


@dataclass
class LoraSection:
    """LoRA through peft; r = 0 trains all parameters."""

    r: int = 0
    alpha: float | None = None  # None: 2 * r
    dropout: float = 0.0
    # "all-linear" or a list of module names (e.g. ["q_proj", "v_proj"])
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelConfig:
    name_or_path: str = ""
    # Compute dtype. "auto": bfloat16 on CUDA, float32 on CPU. With a 16-bit dtype the
    # parameters and optimizer state stay in float32 (small learning rates such as
    # DRIFT's 5e-6 vanish in bfloat16 weights) and the forward pass runs in 16 bits.
    dtype: DTypeName = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: str = "drift_varlen"
    # fused loss backend: "auto", "triton" or "torch"
    loss_impl: Literal["auto", "triton", "torch"] = "auto"
    # torch.compile each decoder layer (the embeddings, final norm and loss stay eager)
    compile: bool = False
    # torch.compile backend; "aot_eager" skips code generation (to tell inductor issues apart)
    compile_backend: str = "inductor"
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to matrices only (not biases, norms, or 1-D tensors)."""

    lr: float = 5e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # clip the global gradient norm to this value (None or 0: no clipping)
    grad_clip: float | None = 1.0
    # a step with a non-finite loss or gradient norm is skipped (no update); this many in
    # a row stop the run with an error (1: stop at the first)
    max_nonfinite_steps: int = 3


@dataclass
class ScheduleConfig:
    name: ScheduleName = "constant_with_warmup"
    # linear warmup over this fraction of the optimizer steps (DRIFT default: 10%)
    warmup_ratio: float = 0.1
    # warmup length in steps; overrides warmup_ratio when set
    warmup_steps: int | None = None
    # cosine only: the final learning rate as a fraction of the peak
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    # save every this many optimizer steps (0: only at the end of training)
    every_steps: int = 0
    # checkpoints kept in the output folder (older ones are deleted)
    keep_last: int = 2
    # "latest" (newest checkpoint in the output folder) or a checkpoint folder
    resume: str | None = None
    # resume even though the data, model, weighting, optimizer or schedule settings differ
    # from the checkpoint's (the differences are recorded in run.json)
    allow_config_change: bool = False
    # LoRA runs: export the merged model (base + adapters) instead of the adapter
    merge_lora: bool = False


@dataclass
class TrainConfig:
    out: str = ""
    seed: int = 0
    # "auto": CUDA when available (this rank's GPU under torchrun), else CPU
    device: str = "auto"
    # "auto": DDP/FSDP decided by the distributed layer when launched with torchrun
    strategy: Strategy = "auto"
    # show the progress bar (on the main rank); without it, a plain log line every 30 s
    progress: bool = True
    # experiment trackers that also get the metrics: "tensorboard" (out/tensorboard),
    # "wandb", "mlflow"; metrics.jsonl is always written
    report_to: list[str] = field(default_factory=list)
    eval: EvalSection = field(default_factory=EvalSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    weighting: WeightingSection = field(default_factory=WeightingSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Check the whole configuration; raise ConfigError on the first problem."""
        _require(self.out, "out", 'the output folder is required (--out DIR or out = "...")')
        _require(self.data.path, "data.path", "the rollouts file is required (--data FILE)")
        _require(
            self.model.name_or_path,
            "model.name_or_path",
            "the model is required (--model PATH_OR_ID)",
        )
        _positive(self.data.batch_tokens, "data.batch_tokens")
        _positive(self.data.grad_accum, "data.grad_accum")
        _positive(self.data.epochs, "data.epochs")
        if self.data.max_steps is not None:
            _positive(self.data.max_steps, "data.max_steps")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(
                    f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
                ) from None
        for key, value in _float_values(self):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        w = self.weighting
        if w.beta is not None and w.beta <= 0:
            raise ConfigError(f"weighting.beta must be > 0, got {w.beta}")
        if w.gamma is not None and not 0 < w.gamma <= 1:
            raise ConfigError(f"weighting.gamma must be in (0, 1], got {w.gamma}")
        if w.clip_max is not None and w.clip_max <= 0:
            raise ConfigError(f"weighting.clip_max must be > 0, got {w.clip_max}")
        o = self.optim
        if not o.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        if o.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {o.eps}")
        if o.grad_clip is not None and o.grad_clip < 0:
            raise ConfigError(
                f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}"
            )
        _positive(o.max_nonfinite_steps, "optim.max_nonfinite_steps")
        s = self.schedule
        if not 0 <= s.warmup_ratio <= 1:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1], got {s.warmup_ratio}")
        if s.warmup_steps is not None and s.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        lora = self.model.lora
        if lora.r < 0:
            raise ConfigError(f"model.lora.r must be >= 0 (0 disables LoRA), got {lora.r}")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        if self.model.compile:
            from drift_engine.models.compile import check_compile_backend

            check_compile_backend(self.model.compile_backend)
        c = self.checkpoint
        if c.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {c.every_steps}")
        _positive(c.keep_last, "checkpoint.keep_last")
        from drift_engine.train.metrics import check_report_to

        check_report_to(self.report_to)
        e = self.eval
        if e.problems:
            _require(e.env, "eval.env", "evaluating during training needs the environment")
            _positive(e.every_steps, "eval.every_steps")
            _positive(e.max_turns, "eval.max_turns")
            _positive(e.max_new_tokens, "eval.max_new_tokens")
            if e.limit is not None:
                _positive(e.limit, "eval.limit")
        return self


def _float_values(config: Any, prefix: str = "") -> list[tuple[str, float | None]]:
    """(dotted key, value) of every float field of ``config`` (tuples item by item)."""
    found: list[tuple[str, float | None]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += _float_values(value, f"{key}.")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, tuple):
            found += [(key, v) for v in value if isinstance(v, float)]
    return found


def _require(value: str, key: str, message: str) -> None:
    if not value:
        raise ConfigError(f"{key} is not set: {message}")


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML file into a TrainConfig (not yet validated: overrides may follow)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested plain values, rejecting unknown keys and bad types."""
    return _build(TrainConfig, raw, prefix="", source=source)


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of ``config`` with dotted keys replaced, e.g. {"optim.lr": 1e-5}.

    None values are skipped (a command line flag that was not given)."""
    config = _deepcopy(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, name = dotted.split(".")
        target = config
        for part in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ConfigError(f"unknown configuration key {dotted!r}")
            target = getattr(target, part)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise ConfigError(f"unknown configuration key {dotted!r}")
        setattr(target, name, _coerce(value, hints[name], dotted, "command line"))
    return config


def _deepcopy(config: TrainConfig) -> TrainConfig:
    return config_from_dict(config.to_dict())


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key {dotted!r} (known keys here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, hint, dotted, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a field's type, converting where lossless (int -> float,
    list -> tuple); raise ConfigError naming the key otherwise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, key, source) for v, a in zip(value, args, strict=True)]
        else:
            items = [_coerce(v, args[0], key, source) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug, not user input
