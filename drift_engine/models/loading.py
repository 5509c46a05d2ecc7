"""Loading Hugging Face causal LMs for packed training, and LoRA through peft."""

from __future__ import annotations

from typing import Any

import torch

from drift_engine.attention import ATTENTION_NAME, register_varlen_attention
from drift_engine.errors import ConfigError, DriftError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float32``, ``"bf16"``, ``"bfloat16"``, ... -> torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if found is None:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return found


def load_model(
    name_or_path_or_config: Any,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str = ATTENTION_NAME,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM ready for packed training.

    ``name_or_path_or_config`` is a Hub id or local directory (weights are loaded), or a
    ``transformers.PretrainedConfig`` (random initialisation: tests and benchmarks).
    ``attn_implementation="drift_varlen"`` (the default) registers and uses the packed
    variable-length attention; any implementation transformers knows ("sdpa", "eager",
    "flash_attention_2") also works with packed batches when the KV cache is off, which
    :func:`~drift_engine.models.model_hidden_states` ensures per call (the config's
    ``use_cache`` is left as is, so saved checkpoints generate with a cache).
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    torch_dtype = parse_dtype(dtype)
    if attn_implementation == ATTENTION_NAME:
        register_varlen_attention()
    kwargs: dict[str, Any] = {
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        if isinstance(name_or_path_or_config, PretrainedConfig):
            model = AutoModelForCausalLM.from_config(name_or_path_or_config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path_or_config), **kwargs)
    except OSError as err:
        raise DriftError(
            f"cannot load model {name_or_path_or_config!r}: {err}. Pass a local directory holding "
            "config.json and the weights, or a Hugging Face Hub id reachable from this machine"
        ) from err
    except ValueError as err:
        if attn_implementation in str(err):
            raise ConfigError(
                f"{name_or_path_or_config!r} does not support attn_implementation="
                f"{attn_implementation!r} ({err}); try attn_implementation='sdpa'"
            ) from err
        raise
    if device is not None:
        model = model.to(device)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"{type(model).__name__} does not support gradient checkpointing; "
                "turn gradient_checkpointing off"
            )
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer.

    transformers >= 5.2x names it ``activation_checkpointing_enable`` (the old name warns).
    """
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _is_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def apply_lora(
    model: torch.nn.Module,
    r: int = 16,
    alpha: float | None = None,
    target_modules: str | list[str] = "all-linear",
    *,
    dropout: float = 0.0,
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters stay trainable.

    ``alpha`` defaults to ``2 * r``. ``target_modules`` is a list of module names or peft's
    ``"all-linear"`` (every linear layer except the LM head). The LM head cannot be adapted:
    the fused loss reads its weight directly.
    """
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'drift-engine[lora]'") from None
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be positive, got {r}")
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if "lm_head" in names:
        raise ConfigError(
            "LoRA on lm_head is not supported: the fused loss uses the LM head's weight directly; "
            "remove 'lm_head' from target_modules"
        )
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    if _is_checkpointing(model):
        # Frozen embeddings give checkpointed blocks inputs without grad; make them track it.
        model.enable_input_require_grads()
    return peft.get_peft_model(model, config)


def position_table_size(model: torch.nn.Module) -> int | None:
    """The number of positions ``model`` was built for (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when its config states none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_position_table(model: torch.nn.Module, lengths: torch.Tensor, *, fix: str) -> None:
    """Raise ``ConfigError`` when a sequence of ``lengths`` (per trajectory, as trained) is
    longer than the model's position table: absolute position embeddings would index past
    their table, rotary ones would train at positions the model never saw. ``fix`` says
    what to do about it."""
    limit = position_table_size(model)
    if limit is None or lengths.numel() == 0:
        return
    longest = int(torch.argmax(lengths))
    if int(lengths[longest]) <= limit:
        return
    count = int((lengths > limit).sum())
    raise ConfigError(
        f"trajectory {longest} is {int(lengths[longest])} tokens long ({count} trajectories "
        f"are over the limit), but the model has {limit} positions (max_position_embeddings); "
        f"{fix}"
    )
