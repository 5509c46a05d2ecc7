"""Hugging Face ``generate`` engine: batched, left-padded, KV cache, CPU or GPU.

Sampling happens in a logits processor that draws each row's token from its own seeded
generator and hands ``generate`` a one-hot score row, which greedy search then picks. So
every request is reproducible by its seed whatever else shares its batch, top-p and
temperature are applied exactly once, and the sampled token's log-prob under the raw model
distribution (``drift_engine.rollout.engine``) is read from the same logits without a
second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from drift_engine.errors import ConfigError
from drift_engine.rollout.engine import (
    Engine,
    Generation,
    SamplingParams,
    request_limits,
    trim_at_stop,
)


class SeededSampler:
    """A ``transformers`` logits processor that samples row i with ``seeds[i]``'s generator.

    Returns scores that are 0 at the chosen token and -inf elsewhere; run ``generate`` with
    greedy search so the choice is taken as is. Records ``log_softmax(raw logits)`` of each
    chosen token when ``record_logprobs``.
    """

    def __init__(self, params: SamplingParams, seeds: Sequence[int], record_logprobs: bool):
        self.params = params
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.record_logprobs = record_logprobs
        self.logprobs: list[torch.Tensor] = []  # per step: (B,) fp32

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: (B, V) fp32 raw logits → chosen token ids (B,) int64."""
        if self.params.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores / self.params.temperature, dim=-1)  # (B, V)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)  # (B, V) each
        if self.params.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= self.params.top_p, 0.0)
        cdf = sorted_probs.cumsum(dim=-1)  # (B, V), unnormalised after top-p
        # One uniform draw per row from that row's own generator (CPU, then moved).
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        u = (u.to(scores.device) * cdf[:, -1].double()).unsqueeze(1)  # (B, 1)
        index = torch.searchsorted(cdf.double(), u, right=True).clamp_(max=cdf.shape[1] - 1)
        # A zero-probability token can only be picked through rounding at the top end.
        index = torch.minimum(index, (sorted_probs > 0).sum(dim=-1, keepdim=True) - 1)
        return sorted_ids.gather(1, index).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.choose(scores)  # (B,)
        if self.record_logprobs:
            logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
            self.logprobs.append(logp.gather(1, chosen[:, None]).squeeze(1))
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen[:, None], 0.0)


class HFEngine(Engine):
    """Generation with ``model.generate`` on a loaded ``transformers`` causal LM."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        *,
        pad_token_id: int,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        """``max_model_len``: the context limit (prompt + completion tokens); default the
        model's ``max_position_embeddings``, as vLLM derives it."""
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        if max_model_len is not None and max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {max_model_len}.")
        self.model = model.eval()
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        pad_token_id: int | None = None,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ) -> HFEngine:
        """Load ``path``: a Hub name, a local folder, a training checkpoint folder or a GGUF
        file (:func:`~drift_engine.models.sources.resolve_model_source`). On CPU "auto"
        dtype means fp32."""
        from transformers import AutoModelForCausalLM

        from drift_engine.models.loading import parse_dtype
        from drift_engine.models.sources import resolve_model_source

        path = resolve_model_source(path)

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto" and device.type == "cpu":
            dtype = torch.float32
        elif dtype != "auto":
            dtype = parse_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:  # ValueError: a folder that is no model
            raise ConfigError(
                f"cannot load the model {path!r}: {err}. Pass a local model folder (config.json "
                "and weights) or a Hugging Face model name that is available offline."
            ) from None
        if pad_token_id is None:
            config = model.generation_config
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
            if isinstance(pad_token_id, list):
                pad_token_id = pad_token_id[0]
        return cls(
            model.to(device),
            pad_token_id=pad_token_id,
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, str]:
        return {
            "engine": self.name,
            "model_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": self.device.type,
            "max_model_len": str(self.max_model_len),
        }

    def close(self) -> None:
        """Drop the model and return its memory (the CUDA cache included)."""
        if getattr(self, "model", None) is None:
            return
        device = self.device
        self.model = None
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    @contextmanager
    def _neutral_generation_config(self, params: SamplingParams):
        """The model's own generation defaults (repetition penalty, top-k, forced tokens …)
        must not alter the distribution we sample from: swap in a neutral config."""
        from transformers import GenerationConfig

        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            pad_token_id=self.pad_token_id,
            eos_token_id=list(params.stop_token_ids) or None,
        )
        try:
            yield
        finally:
            self.model.generation_config = saved

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Generation]:
        from transformers import LogitsProcessorList

        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        sampler = SeededSampler(params, seeds, record_logprobs=params.logprobs)
        with self._neutral_generation_config(params):
            output = self.model.generate(
                input_ids=input_ids.to(self.device),  # (B, L)
                attention_mask=attention_mask.to(self.device),  # (B, L)
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([sampler]),
                eos_token_id=list(params.stop_token_ids) or None,
                pad_token_id=self.pad_token_id,
                use_cache=True,
            )
        new_tokens = output[:, longest:].cpu().tolist()  # (B, steps)
        logprobs = torch.stack(sampler.logprobs, dim=1).cpu() if sampler.logprobs else None
        generations = []
        for row, ids in enumerate(new_tokens):
            ids, stopped = trim_at_stop(ids, params.stop_token_ids)
            generations.append(
                Generation(
                    token_ids=ids,
                    logprobs=logprobs[row, : len(ids)].tolist() if logprobs is not None else None,
                    finish_reason="stop" if stopped else "length",
                )
            )
        return generations

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        limits = request_limits(prompts, seeds, params, max_new_tokens, self.max_model_len)
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("cannot generate from an empty prompt.")
        # Batches share a token limit (no row runs past its own); similar lengths together:
        # less padding. Results do not depend on the grouping.
        order = sorted(range(len(prompts)), key=lambda i: (limits[i], -len(prompts[i])))
        results: list[Generation | None] = [None] * len(prompts)
        start = 0
        while start < len(order):
            limit = limits[order[start]]
            end = start
            while (
                end < len(order)
                and end - start < self.max_batch_size
                and limits[order[end]] == limit
            ):
                end += 1
            chunk = order[start:end]
            outputs = self._generate_batch(
                [prompts[i] for i in chunk],
                replace(params, max_new_tokens=limit),
                [seeds[i] for i in chunk],
            )
            for i, generation in zip(chunk, outputs, strict=True):
                results[i] = generation
            start = end
        return results  # type: ignore[return-value]
