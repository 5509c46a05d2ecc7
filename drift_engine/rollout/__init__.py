"""Generation engines (HF generate, vLLM) and the multi-turn rollout loop."""

from __future__ import annotations

from typing import Any

from drift_engine.errors import ConfigError
from drift_engine.rollout.chat import ChatFormatter
from drift_engine.rollout.engine import Engine, Generation, SamplingParams, request_seed
from drift_engine.rollout.loop import (
    RolloutRun,
    TemplateReport,
    Trajectory,
    TurnStats,
    collect_trajectories,
    format_turn_stats,
    run_rollouts,
    shard_from_env,
    shard_range,
    to_rollout_set,
    turn_stats,
    write_preview,
)
from drift_engine.rollout.parts import collect_in_parts, discard_parts, parts_folder
from drift_engine.rollout.shards import merge_rollout_sets, merge_rollout_shards, shard_path

__all__ = [
    "ChatFormatter",
    "Engine",
    "Generation",
    "RolloutRun",
    "SamplingParams",
    "TemplateReport",
    "Trajectory",
    "TurnStats",
    "collect_in_parts",
    "collect_trajectories",
    "create_engine",
    "discard_parts",
    "format_turn_stats",
    "load_tokenizer",
    "merge_rollout_sets",
    "merge_rollout_shards",
    "padding_token_id",
    "parts_folder",
    "request_seed",
    "run_rollouts",
    "shard_from_env",
    "shard_path",
    "shard_range",
    "to_rollout_set",
    "turn_stats",
    "write_preview",
]


def padding_token_id(tokenizer: Any) -> int | None:
    """The id that left-pads batched prompts: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def create_engine(
    kind: str,
    model: str,
    *,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    device: str | None = None,
    max_batch_size: int = 64,
    seed: int = 0,
    pad_token_id: int | None = None,
    trust_remote_code: bool = False,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    vllm_args: dict[str, Any] | None = None,
) -> Engine:
    """``kind``: "hf", "vllm", or "auto" (vLLM when installed and a GPU is visible, else HF).
    ``model``: a Hub id, a Hugging Face folder, a training checkpoint folder or a GGUF file
    (:func:`~drift_engine.models.sources.resolve_model_source`).

    ``max_model_len`` (the context limit) applies to both engines; ``gpu_memory_utilization``,
    ``enforce_eager`` and ``vllm_args`` (any other ``vllm.LLM`` argument) to vLLM only.
    Close the engine (``engine.close()`` or ``with``) to free it."""
    import torch

    from drift_engine.rollout.vllm import VLLMEngine, vllm_available

    if kind == "auto":
        kind = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if kind == "vllm":
        return VLLMEngine(
            model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            llm_kwargs=vllm_args,
        )
    if kind == "hf":
        if tensor_parallel_size != 1:
            raise ConfigError(
                "the HF engine runs one model per process (tensor_parallel_size=1); use "
                "--engine vllm for tensor parallelism, or shard prompts over processes."
            )
        given = [
            option
            for option, value in (
                ("--gpu-memory-utilization", gpu_memory_utilization),
                ("--enforce-eager/--no-enforce-eager", enforce_eager),
                ("--vllm-arg", vllm_args or None),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} apply to the vLLM engine only, and this run uses the HF "
                "engine: pass --engine vllm, or drop them."
            )
        from drift_engine.rollout.hf import HFEngine

        return HFEngine.from_pretrained(
            model,
            device=device,
            dtype=dtype,
            pad_token_id=pad_token_id,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
        )
    raise ConfigError(f"unknown engine {kind!r}: use auto, hf or vllm.")


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, checkpoint folder, GGUF file or Hub id (a local path
    works offline), with a clear error when it cannot be loaded."""
    from transformers import AutoTokenizer

    from drift_engine.models.sources import resolve_model_source

    try:
        return AutoTokenizer.from_pretrained(
            resolve_model_source(path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load tokenizer {path!r}: {err}; pass a local folder holding its tokenizer "
            "files (tokenizer.json / tokenizer_config.json) or a Hugging Face id reachable "
            "from this machine."
        ) from None
