"""Sharded rollout runs: one process (and GPU) per block of prompts, merged into one set.

Shard r of w rolls out a contiguous block of the prompts (``shard_range``) and writes
``<out stem>.rank<r>-of-<w>.safetensors`` (five-digit numbers). Group ids are global prompt
indices and every request's seed depends only on (seed, prompt, sample, turn), so the
shards, merged in rank order, are exactly the single-process run.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set, no explicit ``--shard-rank``) rank 0 waits
for every rank's shard and merges them into ``--out``. Completion goes through the
rendezvous store torchrun already runs (``MASTER_ADDR``/``MASTER_PORT``): a rank sets its
key once its shard is on disk (files are written under a temporary name and renamed, so a
file that exists is complete) and rank 0 waits for all keys. No process group is created:
the vLLM engine sets up ``torch.distributed`` for its own tensor-parallel world inside the
process, and a second default group could not coexist with it. The keys live in this
launch's store, so shard files left from an earlier run with the same ``--out`` are never
taken for this run's.

Shards of separate jobs (e.g. one vLLM engine per GPU launched by hand with
``--shard-rank/--shard-world``) are merged with ``merge_rollout_shards`` or
``drift-engine rollout --merge SHARD... --out FILE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch

from drift_engine.data.rollouts import (
    META_BETA,
    META_CLIP_MAX,
    META_GAMMA,
    META_NORMALIZE,
    RolloutSet,
    load_rollouts,
    save_rollouts,
)
from drift_engine.errors import ConfigError, RolloutFormatError
from drift_engine.files import atomic_path
from drift_engine.launch import torchrun_env
from drift_engine.rollout.loop import (
    META_CONTEXT_LIMIT,
    META_PROBLEMS,
    META_SHARD,
    META_TEMPLATE_MISMATCHES,
    META_TURN_STATS,
    TemplateReport,
    TurnStats,
    context_limit_summary,
    format_turn_stats,
    shard_from_env,
    turn_stats_from_json,
    turn_stats_to_json,
)

# Metadata entries that differ between shards and are combined; all others must agree.
COMBINED_METADATA = (META_SHARD, META_TEMPLATE_MISMATCHES, META_TURN_STATS, META_CONTEXT_LIMIT)
# How long rank 0 waits for the other ranks' shards after finishing its own.
SHARD_WAIT_TIMEOUT = timedelta(hours=24)
_STORE_PREFIX = "drift_engine/rollout/shard_written"


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    """``roll.safetensors`` -> ``roll.rank00001-of-00004.safetensors`` (``out`` when world is 1)."""
    out = Path(out)
    if world == 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank:05d}-of-{world:05d}{out.suffix}")


@dataclass(frozen=True)
class ShardLaunch:
    """Where this process stands in a sharded rollout run."""

    rank: int
    world: int
    local_rank: int | None  # torchrun's LOCAL_RANK: which of the node's GPUs this process uses
    merge: bool  # torchrun chose the sharding: rank 0 merges the shards into one set


def shard_launch(shard_rank: int | None = None, shard_world: int | None = None) -> ShardLaunch:
    """Explicit ``shard_rank``/``shard_world`` (both or neither) make this process one shard
    of a run launched by other means, merged later; without them torchrun's
    ``RANK``/``WORLD_SIZE`` decide, and a torchrun run with several ranks merges itself."""
    if (shard_rank is None) != (shard_world is None):
        raise ConfigError("give --shard-rank and --shard-world together (or neither).")
    env_rank, env_world = shard_from_env()
    explicit = shard_rank is not None
    rank, world = (shard_rank, shard_world) if explicit else (env_rank, env_world)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard rank must lie in [0, {world}) with world >= 1, got rank {rank}.")
    local_rank = torchrun_env().local_rank
    return ShardLaunch(rank, world, local_rank, merge=not explicit and world > 1)


def pin_visible_gpus(local_rank: int, per_process: int) -> str:
    """Give this process GPUs ``[local_rank * per_process, (local_rank + 1) * per_process)``
    of the node through ``CUDA_VISIBLE_DEVICES`` (indices into the variable's list when it is
    set) and return the new value. For engines that use every visible GPU (vLLM): call it
    before anything initialises CUDA in the process, since CUDA reads the variable once."""
    if per_process < 1:
        raise ConfigError(f"tensor parallel size must be at least 1, got {per_process}.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = local_rank * per_process
    if visible is None:
        chosen = [str(i) for i in range(first, first + per_process)]
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        chosen = devices[first : first + per_process]
        if len(chosen) < per_process:
            raise ConfigError(
                f"local rank {local_rank} needs GPUs {first}..{first + per_process - 1} of "
                f"CUDA_VISIBLE_DEVICES={visible!r}, which lists {len(devices)}: start at most "
                f"{len(devices) // per_process} processes per node with --tensor-parallel-size "
                f"{per_process}."
            )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def process_device(local_rank: int | None) -> str | None:
    """The HF engine's device: ``cuda:LOCAL_RANK`` under torchrun with CUDA, ``cpu`` under
    torchrun without it, ``None`` (the engine's default) outside torchrun."""
    if local_rank is None:
        return None
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own: this node shows {count} GPUs; "
            f"start at most {count} processes per node (--nproc-per-node)."
        )
    return f"cuda:{local_rank}"


def wait_for_shards(launch: ShardLaunch, timeout: timedelta = SHARD_WAIT_TIMEOUT) -> None:
    """Announce that this rank's shard is written; on rank 0, return once every rank has.

    Call after the shard file is in place. Uses torchrun's rendezvous store only (see the
    module docstring)."""
    import torch.distributed as dist

    store, _, _ = next(
        dist.rendezvous("env://", rank=launch.rank, world_size=launch.world, timeout=timeout)
    )
    store.set(f"{_STORE_PREFIX}/{launch.rank}", "1")
    if launch.rank != 0:
        return
    try:
        store.wait([f"{_STORE_PREFIX}/{r}" for r in range(launch.world)], timeout)
    except dist.DistError as err:
        raise ConfigError(
            f"not every rank wrote its shard within {timeout}: {err}. The shards that were "
            "written stay on disk; merge them with drift-engine rollout --merge once all exist."
        ) from None


# ---- merging --------------------------------------------------------------------------------


def _shard_coordinates(rs: RolloutSet, name: str) -> tuple[int, int]:
    raw = rs.metadata.get(META_SHARD)
    try:
        rank, world = (int(x) for x in (raw or "").split("/"))
    except ValueError:
        raise RolloutFormatError(
            f"{name} has no valid shard entry in its metadata ({META_SHARD!r} = {raw!r}): it "
            "was not written by a sharded rollout run. Combine separate runs with "
            "load_rollouts([...], group_ids='offset')."
        ) from None
    return rank, world


def merge_rollout_sets(
    sets: Sequence[RolloutSet], names: Sequence[str] | None = None
) -> RolloutSet:
    """Merge the shards of one sharded run, in any order, into the set the single-process
    run gives: trajectories in rank order, group ids kept, the per-shard summaries combined.

    Raises ``RolloutFormatError`` when a shard is missing or given twice, when the shards
    disagree on any other metadata (sampling parameters, environment, tokenizer, problem
    list, reference model, weighting ...) or when two shards hold the same group id.
    ``names`` (e.g. file paths) label the shards in messages.
    """
    if not sets:
        raise RolloutFormatError("no shards to merge")
    names = list(names) if names is not None else [f"shard {i}" for i in range(len(sets))]
    coords = [_shard_coordinates(s, n) for s, n in zip(sets, names, strict=True)]
    worlds = sorted({w for _, w in coords})
    if len(worlds) > 1:
        raise RolloutFormatError(
            f"the shards come from runs split {worlds} ways: "
            + ", ".join(f"{n} is {r}/{w}" for n, (r, w) in zip(names, coords, strict=True))
        )
    world = worlds[0]
    by_rank: dict[int, int] = {}
    for i, (rank, _) in enumerate(coords):
        if rank in by_rank:
            raise RolloutFormatError(
                f"shard {rank}/{world} is given twice: {names[by_rank[rank]]} and {names[i]}"
            )
        by_rank[rank] = i
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        raise RolloutFormatError(
            f"shards {missing} of {world} are missing; merge all {world} shards of the run"
        )
    order = [by_rank[r] for r in range(world)]
    sets = [sets[i] for i in order]
    names = [names[i] for i in order]

    reference = {k: v for k, v in sets[0].metadata.items() if k not in COMBINED_METADATA}
    for s, name in zip(sets[1:], names[1:], strict=True):
        other = {k: v for k, v in s.metadata.items() if k not in COMBINED_METADATA}
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                raise RolloutFormatError(
                    f"cannot merge: {names[0]} and {name} differ in metadata {key!r} "
                    f"({_short(reference.get(key))} vs {_short(other.get(key))}); the shards "
                    "of one run share the model, tokenizer, environment, problems and sampling "
                    "parameters"
                )

    owners: dict[int, str] = {}
    for s, name in zip(sets, names, strict=True):
        for gid in torch.unique(s.group_ids).tolist():
            if gid in owners:
                raise RolloutFormatError(
                    f"cannot merge: group id {gid} is in {owners[gid]} and in {name}; each "
                    "prompt group belongs to one shard"
                )
            owners[gid] = name

    metadata = {**reference, META_SHARD: "0/1"}
    if all(META_TEMPLATE_MISMATCHES in s.metadata for s in sets):
        reports = [TemplateReport.from_json(s.metadata[META_TEMPLATE_MISMATCHES]) for s in sets]
        metadata[META_TEMPLATE_MISMATCHES] = TemplateReport.combine(reports).to_json()
    if all(META_TURN_STATS in s.metadata for s in sets):
        stats = [turn_stats_from_json(s.metadata[META_TURN_STATS]) for s in sets]
        metadata[META_TURN_STATS] = turn_stats_to_json(_add_turn_stats(stats))
    if all(META_CONTEXT_LIMIT in s.metadata for s in sets):
        limits = [json.loads(s.metadata[META_CONTEXT_LIMIT]) for s in sets]
        metadata[META_CONTEXT_LIMIT] = json.dumps(
            {
                "trajectories": sum(c["trajectories"] for c in limits),
                "max_model_len": limits[0]["max_model_len"],  # the engine's: in metadata too
            }
        )
    merged = replace(RolloutSet.concat(sets, group_ids="keep"), metadata=metadata)
    if merged.weights is not None and reference.get(META_NORMALIZE) == "global" and world > 1:
        merged = _reweight_globally(merged)
    return merged


def _short(value: str | None, limit: int = 120) -> str:
    if value is None:
        return "absent"
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _add_turn_stats(per_shard: Sequence[Sequence[TurnStats]]) -> list[TurnStats]:
    turns = max(len(stats) for stats in per_shard)
    total = sum(stats[0].total for stats in per_shard if stats)
    out = []
    for k in range(turns):
        present = [stats[k] for stats in per_shard if k < len(stats)]
        out.append(
            TurnStats(
                turn=k + 1,
                answered=sum(s.answered for s in present),
                correct=sum(s.correct for s in present),
                solved=sum(s.solved for s in present),
                total=total,
                scoring_errors=sum(s.scoring_errors for s in present),
            )
        )
    return out


def _reweight_globally(rs: RolloutSet) -> RolloutSet:
    """Weights normalised over each shard's trajectories, recomputed over the whole set
    (group-normalised weights need nothing: every group lies in one shard)."""
    from drift_engine.weighting import WeightingConfig, attach_weights

    meta = rs.metadata
    clip = meta.get(META_CLIP_MAX)
    config = WeightingConfig(
        gamma=float(meta[META_GAMMA]),
        beta=float(meta[META_BETA]),
        clip_max=None if clip is None else float(clip),
        normalize="global",
    )
    return attach_weights(replace(rs, returns=None, weights=None), config)


def merge_rollout_shards(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    delete_shards: bool = False,
    max_shard_bytes: int | None = None,
) -> tuple[RolloutSet, list[Path]]:
    """Merge the shard files of one sharded run (any order) into ``out``.

    ``out`` is written as one file, or with ``max_shard_bytes`` as the format's own sharded
    set (``<stem>-00001-of-0000N.safetensors`` + index), which ``load_rollouts(out)`` reads
    as one set. With ``delete_shards`` the given files are removed once ``out`` is written.
    Returns the merged set and the files written. See ``merge_rollout_sets`` for the checks.
    """
    inputs = [Path(p) for p in paths]
    if not inputs:
        raise ConfigError("no shard files to merge.")
    out = Path(out)
    resolved = {p.resolve() for p in inputs}
    if out.resolve() in resolved:
        raise ConfigError(f"the merged output {str(out)!r} is also one of the shards to merge.")
    if len(resolved) != len(inputs):
        raise ConfigError("the same shard file is given twice.")
    sets = [load_rollouts(p, allow_empty=True) for p in inputs]
    merged = merge_rollout_sets(sets, [str(p) for p in inputs])
    written = save_rollouts(out, merged, max_shard_bytes=max_shard_bytes)
    if delete_shards:
        for p in inputs:
            p.unlink(missing_ok=True)
    return merged, written


def merge_text_pieces(
    pieces: Sequence[str | os.PathLike], out: str | os.PathLike, *, delete: bool
) -> Path:
    """Concatenate text files (e.g. per-rank JSONL previews) in order into ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tmp.open("wb") as dst:
        for piece in pieces:
            dst.write(Path(piece).read_bytes())
    if delete:
        for piece in pieces:
            Path(piece).unlink(missing_ok=True)
    return out


def summary_lines(rollouts: RolloutSet) -> list[str]:
    """Per-turn accuracy table and token-bookkeeping line of a set written by the rollout loop."""
    meta = rollouts.metadata
    lines = []
    if META_TURN_STATS in meta:
        lines.append(format_turn_stats(turn_stats_from_json(meta[META_TURN_STATS])))
    if META_TEMPLATE_MISMATCHES in meta:
        lines.append(TemplateReport.from_json(meta[META_TEMPLATE_MISMATCHES]).summary())
    if META_CONTEXT_LIMIT in meta and (line := context_limit_summary(meta[META_CONTEXT_LIMIT])):
        lines.append(line)
    return lines


def problem_count(rollouts: RolloutSet) -> int | None:
    """The number of problems of the run (all shards), when recorded."""
    raw = rollouts.metadata.get(META_PROBLEMS)
    return None if raw is None else int(json.loads(raw)["count"])
