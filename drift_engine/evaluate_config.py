"""EvalConfig: the settings of a multi@k evaluation, one documented, checked field each.

They are ``drift-engine eval``'s flags (generated from these fields: their flag, type,
choices, default and help) and the keys of its ``--config`` TOML file, e.g.::

    models = ["ref/", "runs/drift/checkpoint-000120"]
    labels = ["reference", "drift"]
    problems = ["heldout.jsonl"]
    env = "math"
    max_turns = 5
    out = "eval/"

``drift_engine.evaluate.run_eval(config)`` runs it. Reading a configuration imports no
model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from drift_engine.errors import ConfigError
from drift_engine.fields import HELP, at_least, check_fields, option
from drift_engine.train.config import DTypeName, load_config

EngineName = Literal["auto", "hf", "vllm"]

# Fields that a run cannot do without: their flag is reported missing, as click reports a
# required option.
REQUIRED = ("models", "problems", "out", "env")


@dataclass
class EvalConfig:
    models: list[str] = option(
        default_factory=list,
        help="Model folder or id (repeatable: compared). Required.",
        flag="--model",
        multiple=True,
    )
    problems: list[str] = option(
        default_factory=list,
        help="Benchmark: JSONL file or hf:NAME (repeatable). Required.",
        flag="--problems",
        multiple=True,
    )
    labels: list[str] = option(
        default_factory=list,
        help="Name of the model in tables and plots, one per --model in the same order.",
        flag="--label",
        multiple=True,
        show_default="the model folder's name",
    )
    max_turns: int = option(
        5, help="Turns per problem: multi@k for k = 1..MAX_TURNS.", flag="--max-turns",
        check=at_least(1),
    )  # fmt: skip
    out: str = option("", help="Output folder. Required.", flag="--out", metavar="PATH")
    overwrite: bool = option(
        False, help="Write into an --out folder that already holds files.", flag="--overwrite"
    )
    progress: bool = option(
        True, help="Progress bar of each model's episodes.", flag="--progress/--no-progress"
    )
    env: str = option(
        "", help="Built-in (math, choice, guess) or package.module:Class. Required.", flag="--env"
    )
    env_options: list[str] = option(
        default_factory=list,
        help="Environment constructor option (repeatable; VALUE parsed as JSON when it can be).",
        flag="--env-opt",
        multiple=True,
        metavar="KEY=VALUE",
    )
    fields: list[str] = option(
        default_factory=list,
        help="Read the environment's field NAME from FILE_FIELD of each record (repeatable).",
        flag="--field",
        multiple=True,
        metavar="NAME=FILE_FIELD",
    )
    limit: int | None = option(None, help="Use only the first N problems.", flag="--limit")
    split: str = option("test", help="Split of a hf:NAME dataset.", flag="--split")
    chat_template: str | None = option(
        None, help="Jinja chat template file, for tokenizers that have none.",
        flag="--chat-template", metavar="PATH",
    )  # fmt: skip
    max_new_tokens: int = option(
        512, help="Tokens per answer.", flag="--max-new-tokens", check=at_least(1)
    )
    engine: EngineName = option(
        "auto",
        help="auto: vLLM when installed and a GPU is visible, else Hugging Face generate.",
        flag="--engine",
    )
    tensor_parallel_size: int = option(
        1, help="vLLM: GPUs per model.", flag="--tensor-parallel-size", check=at_least(1)
    )
    batch_size: int = option(
        64, help="HF engine batch size.", flag="--batch-size", check=at_least(1)
    )
    dtype: DTypeName = option(
        "auto",
        help="Model dtype (auto, bfloat16, float32 ...); auto is float32 on a CPU, the "
        "model's own on a GPU. Recorded in the output's metadata (model_dtype).",
        flag="--dtype",
    )
    max_model_len: int | None = option(
        None,
        help="Context limit in tokens (prompt and answers) of either engine [default: the "
        "model's]. Trajectories that reach it end cleanly (rollout counts them in its "
        "summary; eval scores them as unsolved).",
        flag="--max-model-len",
    )
    gpu_memory_utilization: float | None = option(
        None,
        help="vLLM: fraction of the GPU's memory (on a CPU: of the machine's) to reserve "
        "[default: 0.9 on a GPU; on a CPU a 1 GiB KV cache instead].",
        flag="--gpu-memory-utilization",
    )
    enforce_eager: bool | None = option(
        None,
        help="vLLM: run eagerly, without compilation or CUDA graphs [default: on a CPU only].",
        flag="--enforce-eager/--no-enforce-eager",
    )
    vllm_args: list[str] = option(
        default_factory=list,
        help="vLLM: any other vllm.LLM argument, e.g. kv_cache_memory_bytes=4000000000 "
        "(repeatable; VALUE parsed as JSON when it can be).",
        flag="--vllm-arg",
        multiple=True,
        metavar="KEY=VALUE",
    )

    def missing(self) -> list[str]:
        """The required fields that are not set, in order."""
        return [name for name in REQUIRED if not getattr(self, name)]

    def validate(self) -> EvalConfig:
        """Raise ConfigError on the first problem: a required key unset, then each field's
        own check."""
        for name in self.missing():
            field = EvalConfig.__dataclass_fields__[name]
            raise ConfigError(f"{name} is not set: {field.metadata[HELP]}")
        check_fields(self)
        return self


def load_eval_config(path: str | Path) -> EvalConfig:
    """Read an eval TOML file (not yet validated: flags may follow)."""
    return load_config(path, EvalConfig)
