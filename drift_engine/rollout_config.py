"""RolloutConfig: the settings of a rollout run, one documented, checked field each.

They are ``drift-engine rollout``'s flags (generated from these fields: their flag, type,
choices, default and help) and the keys of its ``--config`` TOML file, e.g.::

    model = "Qwen/Qwen2.5-3B-Instruct"
    problems = "train.jsonl"
    env = "math"
    out = "rollouts.safetensors"
    n = 16
    max_turns = 5

or, to merge the shards of a sharded run, ``merge = true`` and ``shards = [...]``.
``drift_engine.rollout.run.run_rollout(config)`` runs it.

``EnvEngineConfig`` holds the settings that rollout and eval share (the environment, its
problems, the generation engine); both configurations extend it. Reading a configuration
imports no model code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from drift_engine.errors import ConfigError
from drift_engine.fields import (
    FLAG,
    above,
    at_least,
    check_fields,
    field_default,
    load_config,
    option,
    unset_variant,
)
from drift_engine.train.config import DTypeName
from drift_engine.weighting_config import WeightingConfig, from_gamma_beta, gamma_beta_rule

EngineName = Literal["auto", "hf", "vllm"]

_GAMMA_BETA = gamma_beta_rule(
    "stores returns and weights computed from the rewards",
    "no weights are stored (train computes them)",
)


@dataclass
class EnvEngineConfig:
    """The environment, its problems and the generation engine."""

    env: str = option(
        "", help="Built-in (math, choice, guess) or package.module:Class.", flag="--env"
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
        check=at_least(1),
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


def _safetensors_file(path: str) -> str | None:
    return None if path.endswith(".safetensors") else "must end in .safetensors"


def _probability(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


# What a merge of shard files takes; any other key set is refused there.
MERGE_KEYS = ("shards", "merge", "out", "overwrite", "keep_shards", "max_shard_mb", "progress")


@dataclass
class RolloutConfig(EnvEngineConfig):
    """A rollout run: sampling (``model``, ``problems``, ``env`` required) or, with
    ``merge``, merging the shard files of a sharded run (only ``MERGE_KEYS`` taken)."""

    merge: bool = option(
        False,
        help="Merge the SHARDS of a sharded run into --out instead of sampling.",
        flag="--merge",
    )
    shards: list[str] = option(
        default_factory=list,
        help="The shard files to merge (with merge; on the command line: the arguments).",
    )
    model: str = option(
        "", help="Reference policy: a local folder or a Hugging Face id.", flag="--model"
    )
    problems: str = option(
        "",
        help="JSONL problem file (one JSON object per line) or hf:NAME for a Hugging Face dataset.",
        flag="--problems",
    )
    out: str = option(
        "", help="Output rollouts.safetensors. Required.", flag="--out", metavar="PATH",
        check=_safetensors_file,
    )  # fmt: skip
    n: int = option(
        16,
        # torchrun's own parser takes "--n" for an abbreviation of its options: use -n there.
        help="Trajectories per prompt (write -n N under torchrun).",
        flag=("-n", "--n"),
        check=at_least(1),
    )
    max_turns: int = option(5, help="Turns per trajectory.", flag="--max-turns", check=at_least(1))
    temperature: float = option(
        1.0, help="Sampling temperature.", flag="--temperature", check=at_least(0)
    )
    top_p: float = option(1.0, help="Nucleus sampling mass.", flag="--top-p", check=_probability)
    seed: int = option(0, help="Seed of every sample (per prompt, sample, turn).", flag="--seed")
    logprobs: bool = option(
        True, help="Store sampled-token log-probs.", flag="--logprobs/--no-logprobs"
    )
    preview: str | None = option(
        None, help="Also write a human-readable JSONL preview.", flag="--preview", metavar="PATH"
    )
    gamma: float | None = unset_variant(WeightingConfig, "gamma", help=_GAMMA_BETA, flag="--gamma")
    beta: float | None = unset_variant(WeightingConfig, "beta", help=_GAMMA_BETA, flag="--beta")
    shard_rank: int | None = option(
        None,
        help="With --shard-world: write only this shard, to merge later with --merge.",
        flag="--shard-rank",
        show_default="torchrun's RANK, and rank 0 merges",
        check=at_least(0),
    )
    shard_world: int | None = option(
        None,
        help="Number of shards.",
        flag="--shard-world",
        show_default="torchrun's WORLD_SIZE, else 1",
        check=at_least(1),
    )
    keep_shards: bool | None = option(
        None,
        help="Keep or delete the shard files (and preview pieces) once merged.",
        flag="--keep-shards/--delete-shards",
        show_default="delete after a torchrun run, keep with --merge",
    )
    max_shard_mb: float | None = option(
        None,
        help="Write --out as a sharded set of files of at most this many MB (read as one set).",
        flag="--max-shard-mb",
        check=above(0),
    )
    overwrite: bool = option(
        False,
        help="Replace an existing --out (and --preview); without it they are refused.",
        flag="--overwrite",
    )
    prompts_per_part: int = option(
        256,
        help="Write finished trajectories to <out>.partial/ every PROMPTS prompts; a rerun "
        "with the same settings continues from there.",
        flag="--save-every",
        metavar="PROMPTS",
        check=at_least(1, " prompt (--save-every)"),
    )
    progress: bool = option(
        True,
        help="Progress bar of the sampling (--quiet: --no-progress).",
        flag=("--progress/--no-progress", " /--quiet"),
    )

    @property
    def max_shard_bytes(self) -> int | None:
        return None if self.max_shard_mb is None else int(self.max_shard_mb * 1024 * 1024)

    def weighting(self) -> WeightingConfig | None:
        """The weights to store (None: neither gamma nor beta set)."""
        return from_gamma_beta(self.gamma, self.beta)

    def missing(self) -> list[str]:
        """The required fields that are not set, in order."""
        return [] if self.out else ["out"]

    def validate(self) -> RolloutConfig:
        """Raise ConfigError on the first problem: each field's own check, then what the
        mode (sampling, or merging shard files) needs."""
        check_fields(self)
        if self.missing():
            raise ConfigError("out is not set: the output rollouts.safetensors")
        if self.merge:
            given = [name for name in self._set_keys() if name not in MERGE_KEYS]
            if given:
                raise ConfigError(
                    "--merge only takes shard files, --out, --overwrite, "
                    "--keep-shards/--delete-shards and --max-shard-mb; got "
                    f"{', '.join(_flag(name) for name in given)}."
                )
            if not self.shards:
                raise ConfigError("--merge needs the shard files to merge.")
            return self
        if self.shards:
            raise ConfigError(
                f"unexpected arguments {self.shards}: shard files are given with --merge only."
            )
        missing = [_flag(name) for name in ("model", "problems", "env") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (needed unless --merge is given).")
        return self

    def _set_keys(self) -> list[str]:
        """The fields whose value is not their default."""
        return [
            f.name for f in dataclasses.fields(self) if getattr(self, f.name) != field_default(f)
        ]


def _flag(name: str) -> str:
    """The command line flag of RolloutConfig's field ``name``."""
    decl = RolloutConfig.__dataclass_fields__[name].metadata[FLAG]
    decls = [decl] if isinstance(decl, str) else decl
    return next(d for d in decls if d.startswith("--")).split("/")[0]


def load_rollout_config(path: str | Path) -> RolloutConfig:
    """Read a rollout TOML file (not yet validated: flags may follow)."""
    return load_config(path, RolloutConfig)
