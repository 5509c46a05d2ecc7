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

Each field is written once, with its default, help, flag and check
(``drift_engine.fields.option``): ``drift-engine train``'s flags and docs/training.md's table
(``config_reference``) are generated from them, and ``validate`` runs the checks. Unknown
keys and values of the wrong type raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from drift_engine import fields
from drift_engine.errors import ConfigError
from drift_engine.fields import (
    FLAG,
    HELP,
    above,
    at_least,
    check_fields,
    field_default,
    option,
    unset_variant,
    within,
)
from drift_engine.fields import apply_overrides as apply_overrides  # the train API's name
from drift_engine.weighting_config import WeightingConfig, gamma_beta_rule

TrainTurns = Literal["last", "all"]
LossMode = Literal["trajectory", "weighted", "token"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
ScheduleName = Literal["constant_with_warmup", "cosine"]
Strategy = Literal["auto", "none", "ddp", "fsdp"]


def _device_name(name: str) -> str | None:
    if name == "auto":
        return None
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        return "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
    return None


@dataclass
class DataConfig:
    """What is trained on and how it is batched."""

    path: str = option(
        "", help="rollouts.safetensors file, one of its shards, or a directory of shards.",
        flag="--data", metavar="PATH",
    )  # fmt: skip
    train_turns: TrainTurns = option(
        "last",
        help="Assistant turns trained: the last of each trajectory (DRIFT default) or all.",
        flag="--train-turns",
    )
    loss_mode: LossMode = option(
        "trajectory",
        help="Step loss: trajectory = mean over trajectories of w·(token-mean CE) (DRIFT "
        "default), weighted = Σw·ℓ/Σw, token = weighted token mean.",
        flag="--loss-mode",
    )
    batch_tokens: int = option(
        16384,
        help="Token budget of one packed micro-batch; longer trajectories are truncated "
        "from the left.",
        flag="--batch-tokens",
        check=at_least(1),
    )
    grad_accum: int = option(
        1, help="Micro-batches per optimizer step and rank.", flag="--grad-accum",
        check=at_least(1),
    )  # fmt: skip
    epochs: int = option(1, help="Passes over the rollouts.", flag="--epochs", check=at_least(1))
    max_steps: int | None = option(
        None,
        help="Stop after this many optimizer steps in all (unset: run all epochs). On "
        "--resume, a larger value extends the run.",
        flag="--max-steps", check=at_least(1),
    )  # fmt: skip
    shuffle: bool = option(
        True, help="Shuffle the packed micro-batches each epoch (deterministic given the seed)."
    )
    check_tokenizer: bool = option(
        True,
        help="Compare the tokenizer recorded in the rollouts with the model's (off: skipped, "
        "e.g. for a model folder without tokenizer files; recorded in run.json).",
        flag="--check-tokenizer/--no-check-tokenizer",
    )


_TRAIN_GAMMA_BETA = gamma_beta_rule(
    "recomputes the weights from the stored rewards",
    "train with the file's stored weights (computed with the defaults if it has none)",
)


@dataclass
class WeightingSection:
    """DRIFT importance weights: the fields of ``WeightingConfig`` (drift_engine.weighting,
    which owns their meaning and range), each unset by default."""

    gamma: float | None = unset_variant(WeightingConfig, "gamma", help=_TRAIN_GAMMA_BETA)
    beta: float | None = unset_variant(WeightingConfig, "beta", help=_TRAIN_GAMMA_BETA)
    clip_max: float | None = unset_variant(
        WeightingConfig, "clip_max", help="Set: the weights are recomputed, as with --gamma."
    )

    @property
    def overrides(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def resolve(self) -> WeightingConfig:
        """The WeightingConfig of this section: the values set, defaults for the others."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return WeightingConfig(**given)


@dataclass
class EvalSection:
    """multi@k of the model being trained on held-out problems (off while problems is "")."""

    problems: str = option(
        "", help="Held-out problems (JSONL or hf:NAME) evaluated during training (unset: off)."
    )
    env: str = option(
        "",
        help="Environment that checks the answers: a built-in name or package.module:Class, "
        "with its default options.",
    )
    every_steps: int = option(
        100, help="Evaluate every this many optimizer steps, and after the last step.",
        check=at_least(1),
    )  # fmt: skip
    max_turns: int = option(5, help="Turns per evaluated problem.", check=at_least(1))
    max_new_tokens: int = option(512, help="Tokens per answer.", check=at_least(1))
    limit: int | None = option(
        None, help="Evaluate the first this many problems (unset: all).", check=at_least(1)
    )


@dataclass
class LoraSection:
    """LoRA through peft; r = 0 trains all parameters."""

    r: int = option(
        0, help="Train LoRA adapters of this rank (needs peft; 0: all parameters).",
        flag="--lora-r", check=at_least(0, " (0 disables LoRA)"),
    )  # fmt: skip
    alpha: float | None = option(None, help="LoRA alpha (unset: 2 · r).")
    dropout: float = option(0.0, help="LoRA dropout.", check=within(0, 1, high_open=True))
    target_modules: str | list[str] = option(
        "all-linear", help='"all-linear" or a list of module names (e.g. ["q_proj", "v_proj"]).'
    )


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "",
        help="Model to train: a local folder, a Hugging Face id, a GGUF file or a training "
        "checkpoint folder.",
        flag="--model",
    )
    dtype: DTypeName = option(
        "auto",
        help="Compute dtype (auto: bfloat16 on CUDA, float32 on CPU). With a 16-bit dtype the "
        "parameters and optimizer state stay float32 and the forward pass runs in 16 bits.",
        flag="--dtype",
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute activations in backward to save memory.",
        flag="--gradient-checkpointing/--no-gradient-checkpointing",
    )  # fmt: skip
    attn_implementation: str = option(
        "drift_varlen", help="Attention implementation (drift_varlen: packed variable-length)."
    )
    loss_impl: Literal["auto", "triton", "torch"] = option(
        "auto", help="Fused loss backend (auto: triton on CUDA, torch on CPU)."
    )
    compile: bool = option(
        False,
        help="torch.compile each decoder layer (the embeddings, final norm and loss stay "
        "eager): faster steps after a one-time compile.",
        flag="--compile/--no-compile",
    )
    compile_backend: str = option(
        "inductor",
        help="torch.compile backend; aot_eager skips code generation (to tell inductor "
        "issues apart).",
    )
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to matrices only (not biases, norms, or 1-D tensors)."""

    lr: float = option(5e-6, help="Peak learning rate.", flag="--lr", check=above(0))
    weight_decay: float = option(
        0.1, help="AdamW weight decay on matrices (not biases or norms).", flag="--weight-decay",
        check=at_least(0),
    )  # fmt: skip
    betas: tuple[float, float] = option(
        (0.9, 0.999), help="AdamW betas.",
        check=lambda v: None if all(0 <= b < 1 for b in v) else "must be two numbers in [0, 1)",
    )  # fmt: skip
    eps: float = option(1e-8, help="AdamW epsilon.", check=above(0))
    grad_clip: float | None = option(
        1.0, help="Clip the global gradient norm to this (unset or 0: no clipping).",
        flag="--grad-clip", check=at_least(0, " (0 disables clipping)"),
    )  # fmt: skip
    max_nonfinite_steps: int = option(
        3,
        help="A step with a non-finite loss or gradient norm is skipped (no update); this "
        "many in a row stop the run with an error (1: stop at the first).",
        flag="--max-nonfinite-steps", check=at_least(1),
    )  # fmt: skip


@dataclass
class ScheduleConfig:
    name: ScheduleName = option(
        "constant_with_warmup", help="Learning-rate schedule.", flag="--schedule"
    )
    warmup_ratio: float = option(
        0.1,
        help="Linear warmup over this fraction of the optimizer steps, ceil(ratio · steps) "
        "steps (DRIFT: 10%).",
        flag="--warmup-ratio", check=within(0, 1),
    )  # fmt: skip
    warmup_steps: int | None = option(
        None, help="Warmup length in steps; overrides warmup_ratio when set.", check=at_least(0)
    )
    min_lr_ratio: float = option(
        0.0, help="Cosine only: the final learning rate as a fraction of the peak.",
        check=within(0, 1),
    )  # fmt: skip


@dataclass
class CheckpointConfig:
    every_steps: int = option(
        0, help="Checkpoint every this many optimizer steps (0: only at the end).",
        flag="--save-every", check=at_least(0),
    )  # fmt: skip
    keep_last: int = option(
        2, help="Checkpoints kept in the output folder (older ones are deleted).",
        flag="--keep-last", check=at_least(1),
    )  # fmt: skip
    resume: str | None = option(
        None,
        help="Resume from the newest checkpoint in --out (the flag alone: latest), or from "
        "the checkpoint folder given.",
        flag="--resume",
        flag_value="latest",
        metavar="[DIR]",
    )
    allow_config_change: bool = option(
        False,
        help="Resume although data, model, weighting, optimizer or schedule settings differ "
        "from the checkpoint's (recorded in run.json).",
        flag="--allow-config-change",
    )
    merge_lora: bool = option(
        False,
        help="LoRA runs: export the merged model (base + adapters) in checkpoint-N/model "
        "instead of the adapter.",
        flag="--merge-lora",
    )


@dataclass
class TrainConfig:
    out: str = option(
        "", help="Output folder (checkpoints, metrics.jsonl, run.json).", flag="--out",
        metavar="DIR",
    )  # fmt: skip
    seed: int = option(
        0, help="Seed of the data order (epoch e packs with seed + e) and initialisation.",
        flag="--seed", check=at_least(0),
    )  # fmt: skip
    device: str = option(
        "auto",
        help="Device, e.g. cpu, cuda:1 (auto: CUDA when available, this rank's GPU under "
        "torchrun, else CPU).",
        flag="--device",
        check=_device_name,
    )
    strategy: Strategy = option(
        "auto",
        help="Multi-process strategy under torchrun (auto: decided by the distributed layer).",
        flag="--strategy",
    )
    progress: bool = option(
        True,
        help="Progress bar on the main rank; without it, a plain log line every 30 s.",
        flag="--progress/--no-progress",
    )
    report_to: list[str] = option(
        default_factory=list,
        help="Also send the metrics to these trackers (tensorboard: out/tensorboard, wandb, "
        "mlflow; comma-separated on the command line); metrics.jsonl is always written.",
        flag="--report-to",
    )
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
        """Check the whole configuration; raise ConfigError on the first problem: the
        required keys, every field's own check, then what involves several fields."""
        _require(self.out, "out", 'the output folder is required (--out DIR or out = "...")')
        _require(self.data.path, "data.path", "the rollouts file is required (--data FILE)")
        _require(
            self.model.name_or_path,
            "model.name_or_path",
            "the model is required (--model PATH_OR_ID)",
        )
        for key, value in _float_values(self):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        check_fields(self)
        if self.model.compile:
            from drift_engine.models.compile import check_compile_backend

            check_compile_backend(self.model.compile_backend)
        from drift_engine.train.metrics import check_report_to

        check_report_to(self.report_to)
        if self.eval.problems:
            _require(self.eval.env, "eval.env", "evaluating during training needs the environment")
        return self


def fixed_steps_config(
    out: str | Path,
    data_path: str | Path,
    model: str | Path,
    steps: int,
    dtype: DTypeName = "float32",
    data: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    **settings: Any,
) -> TrainConfig:
    """A TrainConfig that trains ``model`` on ``data_path`` for exactly ``steps`` optimizer
    steps (as many epochs as that takes on any data size); ``data``, ``optim``: more
    DataConfig / OptimConfig fields, ``settings``: more TrainConfig fields."""
    return TrainConfig(
        out=str(out),
        data=DataConfig(path=str(data_path), epochs=steps, max_steps=steps, **(data or {})),
        model=ModelConfig(name_or_path=str(model), dtype=dtype),
        optim=OptimConfig(**(optim or {})),
        **settings,
    )


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


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, cls: type = TrainConfig) -> Any:
    """Read a TOML file into a ``cls`` (TrainConfig unless told; not yet validated:
    overrides may follow)."""
    return fields.load_config(path, cls)


def config_from_dict(raw: dict[str, Any], source: str = "config", cls: type = TrainConfig) -> Any:
    """Build a ``cls`` (TrainConfig unless told) from nested plain values."""
    return fields.config_from_dict(raw, cls, source)


def leaf_fields(cls: type = TrainConfig) -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every setting of ``cls`` (TrainConfig unless told)."""
    return fields.leaf_fields(cls)


# ----------------------------------------------------------------------------- reference


def config_reference() -> str:
    """The Markdown table of every TrainConfig key (its flag, default and help): the
    configuration table of docs/training.md, generated from the same fields as --help."""
    rows = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for key, f in leaf_fields():
        default = field_default(f)
        flag = f.metadata.get(FLAG)
        cells = [f"`{key}`", f"`{flag}`" if flag else "", _shown(default), f.metadata[HELP]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _shown(value: Any) -> str:
    """A default as the TOML file spells it ("" shows as blank: a required key)."""
    if value is None:
        return "unset"
    if value == "":
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
