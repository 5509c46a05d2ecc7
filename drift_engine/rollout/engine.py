"""The generation-engine interface: token ids in, token ids (and log-probs) out.

Engines never see text. The multi-turn loop owns the chat template and hands an engine
batches of prompt token ids; the engine returns exactly the ids it sampled, cut after the
first stop token (which is kept), plus the log-prob of each sampled token when asked.

Stored log-probs, identical in every engine: ``log_softmax`` in fp32 of the model's raw
next-token logits (temperature 1, no top-p, no penalties: the distribution of the model
itself, not of the sampler) at the sampled token, the model running in the dtype the engine
reports as ``model_dtype`` in ``describe()``.

An engine has a context limit (``max_model_len``: prompt plus completion tokens, ``None``
for none) and is closed with ``close()`` (or used as a context manager), which frees its
model and any processes it started.

Sampling is reproducible per request: each prompt carries its own seed, so a request
samples the same tokens whatever else is in its batch (up to floating-point differences
between batch shapes).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from drift_engine.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False  # return the sampled tokens' log-probs under the model

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One completion: the sampled ids, ending with the stop token when one was sampled."""

    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token id, when requested
    finish_reason: Literal["stop", "length"] = "length"
    metadata: dict[str, str] = field(default_factory=dict)


class Engine(ABC):
    """Generates completions for batches of tokenised prompts."""

    name: str = "engine"
    max_model_len: int | None = None  # prompt + completion tokens; None = no limit

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """One completion per prompt; ``seeds[i]`` fixes the randomness of prompt i, and
        ``max_new_tokens[i]`` (when given) replaces ``params.max_new_tokens`` for it."""

    def describe(self) -> dict[str, str]:
        """What produced the samples, for the rollout file's metadata."""
        return {"engine": self.name}

    def close(self) -> None:
        """Free the model (and the engine's processes); the engine is unusable afterwards.
        Engines that hold nothing beyond Python objects need not override it."""
        return None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_limits(
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    params: SamplingParams,
    max_new_tokens: Sequence[int] | None,
    max_model_len: int | None,
) -> list[int]:
    """Per-request token limits of a ``generate`` call, its arguments checked: one seed per
    prompt, ``max_new_tokens`` (else ``params``' for all) at least 1 each, and every prompt
    plus its limit within ``max_model_len``. A request over the context is refused rather
    than its limit cut silently (the rollout loop sends only requests that fit)."""
    count = len(prompts)
    if len(seeds) != count:
        raise ValueError(f"{count} prompts but {len(seeds)} seeds")
    if max_new_tokens is None:
        limits = [params.max_new_tokens] * count
    else:
        if len(max_new_tokens) != count:
            raise ValueError(f"{count} prompts but {len(max_new_tokens)} token limits")
        limits = [int(m) for m in max_new_tokens]
        if any(m < 1 for m in limits):
            raise ValueError(f"token limits must be at least 1, got {min(limits)}")
    if max_model_len is not None:
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            if len(prompt) + limit > max_model_len:
                raise ConfigError(
                    f"prompt {i} has {len(prompt)} tokens and may generate {limit}, more than "
                    f"the engine's max model length {max_model_len}: pass smaller token limits "
                    "(the rollout loop does) or raise --max-model-len."
                )
    return limits


def request_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and a request's coordinates (e.g. prompt
    index, sample index, turn): independent of batching, sharding and ordering."""
    key = ":".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def trim_at_stop(token_ids: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Cut ``token_ids`` after the first stop token (kept). Returns (ids, stopped)."""
    stops = set(stop_token_ids)
    for i, token in enumerate(token_ids):
        if token in stops:
            return list(token_ids[: i + 1]), True
    return list(token_ids), False


def parse_env_options(items: tuple[str, ...], what: str = "environment option") -> dict[str, Any]:
    """``("low=1", "name=x")`` → ``{"low": 1, "name": "x"}`` (values parsed as JSON if they can be)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} must look like KEY=VALUE.")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def engine_settings(
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    enforce_eager: bool | None,
    vllm_args: tuple[str, ...],
) -> dict[str, Any]:
    """The engine options shared by ``rollout`` and ``eval``, as ``create_engine`` arguments."""
    return {
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "vllm_args": parse_env_options(vllm_args, "--vllm-arg") or None,
    }
