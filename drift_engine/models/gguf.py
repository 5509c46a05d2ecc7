"""GGUF files as a model source.

Every stage (HF engine, vLLM, the trainer, eval) reads a plain Hugging Face folder. A GGUF file
(or a folder whose only model file is one GGUF) is turned into such a folder once: transformers
reads the file with the ``gguf`` package and dequantises its tensors to fp32, the weights are
copied into a plain model built from the same config (without the ``quantization_config`` that
makes ``save_pretrained`` refuse and vLLM fail with "Unknown quantization method: gguf"), and
the model and tokenizer are saved as safetensors.

``cached_conversion(file)`` gives the converted folder, kept in a cache keyed by the file's
path, size and modification time, so the conversion (seconds to minutes: building a
49k-token BPE tokenizer from GGUF metadata is the slow part) runs once per file. Commands
reach it through :func:`drift_engine.models.sources.resolve_model_source`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from drift_engine.errors import ConfigError
from drift_engine.files import cache_root

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source.json"  # written into each converted folder: where it came from


def find_gguf_file(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file ``name_or_path`` names, or None when it is not a GGUF source.

    A ``*.gguf`` file is one; so is a folder with exactly one ``*.gguf`` and no config.json
    (a folder that has config.json is a Hugging Face folder, whatever else it holds).
    """
    path = Path(name_or_path)
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ConfigError(f"GGUF model {str(path)!r} does not exist; pass the path of a .gguf file.")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(
            f"{str(path)!r} holds several GGUF files ({names}); pass the one to use as --model."
        )
    return found[0] if found else None


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    ident = f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted_folder(gguf: Path) -> Path:
    """Where the conversion of ``gguf`` lives in the cache."""
    return cache_root() / "gguf" / f"{gguf.stem}-{_cache_key(gguf)}"


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``gguf`` as a Hugging Face folder (fp32 safetensors, tokenizer, generation config)
    at ``out``, atomically: ``out`` appears complete or not at all. An existing ``out`` is
    refused, except a complete conversion that another process finished meanwhile (ranks
    under torchrun converting the same file), which is kept."""
    gguf = Path(gguf)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists; remove it or choose another folder.")
    try:
        import gguf as _gguf_package  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError(
            "reading a GGUF model needs the gguf package: pip install 'drift-engine[gguf]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"cannot read GGUF model {str(gguf)!r}: {err}") from None

    config = quantised.config
    if hasattr(config, "quantization_config"):  # a plain model: save_pretrained and vLLM accept it
        del config.quantization_config
    config.name_or_path = str(gguf)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        plain.config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config = GenerationConfig.from_model_config(plain.config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}, indent=2) + "\n"
        )
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / SOURCE_FILE).is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_conversion(gguf: Path) -> Path:
    """The Hugging Face folder of ``gguf`` in the cache, converting it on first use."""
    folder = converted_folder(gguf)
    if not (folder / SOURCE_FILE).is_file():
        convert_gguf(gguf, folder)
    return folder


__all__ = ["cached_conversion", "convert_gguf", "converted_folder", "find_gguf_file"]
