"""vLLM offline engine: ``vllm.LLM`` with tensor parallelism, token ids in and out.

Prompts go in as ``TokensPrompt(prompt_token_ids=...)`` (no text round trip) with one
``vllm.SamplingParams`` per request carrying its own seed. ``logprobs=0`` asks vLLM for the
sampled token's log-prob only, which vLLM computes from the raw model logits (before
temperature and top-p), matching the HF engine.

Tensor parallelism is vLLM's own (``tensor_parallel_size`` GPUs per engine). For data
parallelism, run one engine per process on a shard of the prompts
(``drift_engine.rollout.shards``): under torchrun each process is pinned to its own GPUs
through ``CUDA_VISIBLE_DEVICES`` before CUDA starts, and the engine is built without
torchrun's variables in the environment, so vLLM sets up its own one-engine world instead
of joining the torchrun job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from drift_engine.errors import ConfigError
from drift_engine.rollout.engine import Engine, Generation, SamplingParams, trim_at_stop

# Set by torchrun for its workers. vLLM reads LOCAL_RANK, and torch.distributed's env://
# setup the others, when vLLM starts the workers of its own (tensor-parallel) world.
_TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@contextmanager
def without_torchrun_environment() -> Iterator[None]:
    """Hide torchrun's variables while vLLM starts (its worker processes inherit the
    environment of that moment); they are restored afterwards for the shard merge."""
    saved = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name in _TORCHRUN_VARIABLES or name.startswith("TORCHELASTIC_")
    }
    try:
        yield
    finally:
        os.environ.update(saved)


class VLLMEngine(Engine):
    """Generation with vLLM's offline ``LLM`` engine."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise ConfigError(
                "the vLLM engine needs the vllm package, which is not installed: "
                "pip install 'drift-engine[vllm]' on a CUDA machine, or use --engine hf."
            ) from None
        self._vllm = vllm
        self.model_name = model
        self.tensor_parallel_size = tensor_parallel_size
        with without_torchrun_environment():
            self.llm = vllm.LLM(
                model=model,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                # Sampling follows our SamplingParams only, not the model's
                # generation_config.json.
                generation_config="vllm",
                **llm_kwargs,
            )

    def describe(self) -> dict[str, str]:
        return {
            "engine": self.name,
            "vllm_version": getattr(self._vllm, "__version__", "unknown"),
            "tensor_parallel_size": str(self.tensor_parallel_size),
        }

    def _request_params(self, params: SamplingParams, seed: int) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=int(seed) % (2**31),  # vLLM seeds must fit a C int on some versions
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0 if params.logprobs else None,
            detokenize=False,
            skip_special_tokens=False,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        outputs = self.llm.generate(
            requests, [self._request_params(params, s) for s in seeds], use_tqdm=False
        )
        generations = []
        for output in outputs:  # vLLM returns outputs in request order
            completion = output.outputs[0]
            ids, stopped = trim_at_stop(list(completion.token_ids), params.stop_token_ids)
            logprobs = None
            if params.logprobs:
                # completion.logprobs: one {token_id: Logprob} dict per generated position
                logprobs = [
                    float(step[token].logprob)
                    for step, token in zip(completion.logprobs, ids, strict=False)
                ]
            generations.append(
                Generation(
                    token_ids=ids,
                    logprobs=logprobs,
                    finish_reason="stop"
                    if stopped or completion.finish_reason == "stop"
                    else "length",
                )
            )
        return generations
