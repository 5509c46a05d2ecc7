"""Progressive rollout: the prompts of a run (or of one shard) in parts, each written to disk
as soon as it is sampled, so a crash or a kill keeps what was finished and a rerun continues.

The parts of output ``roll.safetensors`` live in the folder ``roll.safetensors.partial/``:
``part-00003.safetensors`` holds the trajectories of the third block of ``prompts_per_part``
prompts (a complete rollout file, written under a temporary name and renamed, so a part
that exists is whole), ``part-00003.jsonl`` its preview lines when a preview is asked for,
and ``run.json`` what the run depends on (problems, environment, sampling, seed, shard,
tokenizer, engine, part size). A rerun with the same
settings loads the parts that exist and samples only the others; since every request's seed
depends only on (seed, prompt, sample, turn), the result is the set an uninterrupted run
writes. A folder left by a run with other settings is refused (``overwrite=True`` discards
it). The caller writes the final output, then removes the folder with ``discard_parts``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from drift_engine.data.rollouts import (
    META_FORMAT,
    META_FORMAT_VERSION,
    META_TOKENIZER_VOCAB_HASH,
    RolloutSet,
    load_rollouts,
    save_rollouts,
    tokenizer_fingerprint,
)
from drift_engine.envs import Environment, environment_spec
from drift_engine.envs.base import Problem
from drift_engine.errors import ConfigError
from drift_engine.files import atomic_path, write_text_atomic
from drift_engine.rollout.engine import Engine, SamplingParams
from drift_engine.rollout.loop import (
    META_SHARD,
    collect_trajectories,
    problems_fingerprint,
    progress_bar,
    shard_range,
    to_rollout_set,
    validate_problems,
    write_preview,
)
from drift_engine.rollout.shards import merge_rollout_sets, merge_text_pieces

DEFAULT_PROMPTS_PER_PART = 256
RUN_FILE = "run.json"


def parts_folder(out: str | os.PathLike) -> Path:
    """``roll.safetensors`` -> ``roll.safetensors.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _part_name(k: int) -> str:
    # Not "<stem>-00003-of-00010": that names a shard of one sharded rollout set.
    return f"part-{k + 1:05d}"


def _own_files(folder: Path) -> list[Path]:
    names = {RUN_FILE}
    return [
        p
        for p in folder.iterdir()
        if p.name in names
        or (p.name.startswith("part-") and p.suffix in (".safetensors", ".jsonl"))
        # temporary files of an interrupted write
        or p.name.startswith((".part-", f".{RUN_FILE}.tmp-"))
    ]


def discard_parts(folder: str | os.PathLike) -> None:
    """Remove a parts folder: only the files this module writes, then the folder if empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in _own_files(folder):
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else lives there: leave it


def collect_in_parts(
    engine: Engine,
    tokenizer: Any,
    env: Environment,
    problems: Sequence[Problem],
    folder: str | os.PathLike,
    *,
    n: int,
    max_turns: int,
    sampling: SamplingParams,
    seed: int,
    shard_rank: int = 0,
    shard_world: int = 1,
    prompts_per_part: int = DEFAULT_PROMPTS_PER_PART,
    progress: bool = True,
    chat_template: str | None = None,
    metadata: dict[str, str] | None = None,
    preview: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> RolloutSet:
    """Roll out this shard's prompts part by part into ``folder`` (see the module docstring)
    and return the whole shard's set, as ``to_rollout_set(collect_trajectories(...))`` gives
    it with ``metadata`` added. With ``preview``, the preview JSONL of all parts is written
    there at the end. ``log`` receives a line when earlier parts are reused."""
    if prompts_per_part < 1:
        raise ConfigError(f"prompts per part must be at least 1, got {prompts_per_part}.")
    folder = Path(folder)
    validate_problems(env, problems)  # once, before anything is sampled
    block = shard_range(len(problems), shard_rank, shard_world)
    ranges = [
        range(start, min(start + prompts_per_part, block.stop))
        for start in range(block.start, block.stop, prompts_per_part)
    ] or [block]
    count = len(ranges)
    run = {
        "problems": json.loads(problems_fingerprint(problems)),
        "env": environment_spec(env),
        "env_config": env.config(),
        "sampling": {**asdict(sampling), "stop_token_ids": list(sampling.stop_token_ids)},
        "n": n,
        "max_turns": max_turns,
        "seed": seed,
        "shard": f"{shard_rank}/{shard_world}",
        "prompts_per_part": prompts_per_part,
        "tokenizer": tokenizer_fingerprint(tokenizer)[META_TOKENIZER_VOCAB_HASH],
        "engine": engine.describe(),
        "metadata": dict(metadata or {}),
    }
    run = json.loads(json.dumps(run, sort_keys=True, default=str))
    _prepare(folder, run, overwrite)

    names = [_part_name(k) for k in range(count)]
    done = [k for k in range(count) if (folder / f"{names[k]}.safetensors").is_file()]
    unpreviewed = [names[k] for k in done if not (folder / f"{names[k]}.jsonl").is_file()]
    if preview is not None and unpreviewed:
        if not overwrite:
            raise ConfigError(
                f"the finished parts {unpreviewed} in {str(folder)!r} were sampled without a "
                "preview; rerun without --preview to continue the run, or pass --overwrite to "
                "start over."
            )
        discard_parts(folder)
        _prepare(folder, run, overwrite=False)
        done = []
    if done and log is not None:
        prompts = sum(len(ranges[k]) for k in done)
        log(
            f"resuming from {folder}: {len(done)} of {count} parts ({prompts} of {len(block)} "
            "prompts) were sampled by an earlier run with these settings; sampling the rest"
        )
    todo = [k for k in range(count) if k not in done]
    bar = progress_bar(sum(len(ranges[k]) for k in todo) * n, progress)
    try:
        for k in todo:
            part_run = collect_trajectories(
                engine,
                tokenizer,
                env,
                problems,
                n=n,
                max_turns=max_turns,
                sampling=sampling,
                seed=seed,
                shard_rank=shard_rank,
                shard_world=shard_world,
                progress=bar,
                chat_template=chat_template,
                prompt_range=ranges[k],
            )
            part = to_rollout_set(part_run, {**(metadata or {}), META_SHARD: f"{k}/{count}"})
            if preview is not None:
                # The preview piece first: a part whose rollout file exists is complete.
                with atomic_path(folder / f"{names[k]}.jsonl") as tmp:
                    write_preview(part_run, tmp)
            save_rollouts(folder / f"{names[k]}.safetensors", part)
    finally:
        bar.close()

    paths = [folder / f"{name}.safetensors" for name in names]
    parts = [load_rollouts(p, allow_empty=True) for p in paths]
    merged = merge_rollout_sets(parts, [str(p) for p in paths])
    # The metadata an uninterrupted run gives: this shard, no file-format entries.
    meta = {k: v for k, v in merged.metadata.items() if k not in (META_FORMAT, META_FORMAT_VERSION)}
    merged = replace(merged, metadata={**meta, META_SHARD: f"{shard_rank}/{shard_world}"})
    if preview is not None:
        merge_text_pieces([folder / f"{name}.jsonl" for name in names], preview, delete=False)
    return merged


def _prepare(folder: Path, run: dict[str, Any], overwrite: bool) -> None:
    """Create ``folder`` with ``run.json``, or check that the run it holds is this one."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} (the folder of finished parts) is not a folder.")
    record = folder / RUN_FILE
    if record.is_file():
        try:
            earlier = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if earlier != run:
            if not overwrite:
                differs = (
                    sorted(k for k in set(run) | set(earlier) if run.get(k) != earlier.get(k))
                    if isinstance(earlier, dict)
                    else ["its run.json"]
                )
                raise ConfigError(
                    f"{str(folder)!r} holds the finished parts of a rollout run with other "
                    f"settings (differs in {', '.join(differs)}); rerun with those settings to "
                    "continue it, or pass --overwrite to discard it and start over."
                )
            discard_parts(folder)
    elif folder.is_dir() and any(p.name.startswith("part-") for p in _own_files(folder)):
        if not overwrite:
            raise ConfigError(
                f"{str(folder)!r} holds rollout parts without {RUN_FILE}; pass --overwrite to "
                "discard them and start over."
            )
        discard_parts(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        write_text_atomic(record, json.dumps(run, indent=2, sort_keys=True) + "\n")
