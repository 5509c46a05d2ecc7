"""``run_rollout(config)``: the whole ``rollout`` command as a library call.

Sharded runs give each process a contiguous block of the prompts; each writes
``<out stem>.rank<r>-of-<w>.safetensors``. Under ``torchrun --nproc-per-node N -m
drift_engine rollout ...`` rank 0 then merges the shards into ``out``; processes started
with explicit ``shard_rank``/``shard_world`` leave their shards for a run with ``merge``
(``drift-engine rollout --merge SHARD... --out FILE``; see ``drift_engine.rollout.shards``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from drift_engine.data.rollouts import (
    META_REFERENCE_MODEL,
    RolloutSet,
    check_output_file,
    save_rollouts,
)
from drift_engine.rollout_config import RolloutConfig


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_rollout(
    config: RolloutConfig,
    *,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = _to_stderr,
) -> RolloutSet | None:
    """Sample ``config.n`` trajectories per problem (or, with ``config.merge``, merge the
    shard files ``config.shards``) into ``config.out``; return the set written (None on a
    torchrun rank other than 0, whose shard rank 0 merges). ``echo`` gets the summary lines,
    ``log`` the progress notes (resuming from parts).

    Every output is checked before any work, and everything that can be checked before the
    weights load is: the environment, the problems, the tokenizer's chat template. Finished
    trajectories are written to ``<out>.partial/`` every ``prompts_per_part`` prompts, so a
    rerun with the same settings continues; the engine is closed before rank 0 waits for
    the other shards."""
    config.validate()
    out_path = Path(config.out)
    if config.merge:
        check_output_file(out_path, overwrite=config.overwrite)
        return _merge_files(config, echo)

    from drift_engine.envs import load_environment, load_problems, parse_field_mapping
    from drift_engine.rollout import (
        ChatFormatter,
        SamplingParams,
        create_engine,
        load_tokenizer,
        padding_token_id,
    )
    from drift_engine.rollout.chat import read_chat_template
    from drift_engine.rollout.engine import engine_settings, parse_env_options
    from drift_engine.rollout.parts import collect_in_parts, discard_parts, parts_folder
    from drift_engine.rollout.shards import (
        merge_rollout_shards,
        merge_text_pieces,
        pin_visible_gpus,
        process_device,
        shard_launch,
        shard_path,
        summary_lines,
        wait_for_shards,
    )
    from drift_engine.rollout.vllm import vllm_available

    launch = shard_launch(config.shard_rank, config.shard_world)
    rank, world = launch.rank, launch.world
    preview = None if config.preview is None else Path(config.preview)
    # Outputs are checked before any work: a torchrun run writes out (its rank files are
    # its own intermediates), a shard of a run merged later writes its shard file.
    check_output_file(
        out_path if launch.merge else shard_path(out_path, rank, world),
        overwrite=config.overwrite,
    )
    if preview is not None:
        check_output_file(
            preview if launch.merge else shard_path(preview, rank, world),
            overwrite=config.overwrite,
            option="--preview",
        )

    env = load_environment(config.env, **parse_env_options(config.env_options))
    problem_list = load_problems(
        config.problems,
        fields=parse_field_mapping(config.fields),
        env=env,
        limit=config.limit,
        split=config.split,
    )
    sampling = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        logprobs=config.logprobs,
    )
    tokenizer = load_tokenizer(config.model)
    chat_template = read_chat_template(config.chat_template)
    ChatFormatter(tokenizer, chat_template)  # fail on a missing template before loading weights

    device = None
    if launch.local_rank is not None:
        # vLLM uses every GPU it can see, so each torchrun process gets its own before CUDA
        # starts (the check for a GPU in "auto" would start it); HF takes cuda:LOCAL_RANK.
        if config.engine == "vllm" or (config.engine == "auto" and vllm_available()):
            pin_visible_gpus(launch.local_rank, config.tensor_parallel_size)
        else:
            device = process_device(launch.local_rank)
    engine = create_engine(
        config.engine,
        config.model,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=config.dtype,
        device=device,
        max_batch_size=config.batch_size,
        seed=config.seed,
        pad_token_id=padding_token_id(tokenizer),
        **engine_settings(
            config.max_model_len, config.gpu_memory_utilization, config.enforce_eager,
            config.vllm_args,
        ),
    )  # fmt: skip
    path = shard_path(out_path, rank, world)
    with engine:  # closed before rank 0 waits for the other shards
        rollouts = collect_in_parts(
            engine,
            tokenizer,
            env,
            problem_list,
            parts_folder(path),
            n=config.n,
            max_turns=config.max_turns,
            sampling=sampling,
            seed=config.seed,
            shard_rank=rank,
            shard_world=world,
            prompts_per_part=config.prompts_per_part,
            # One progress bar per torchrun job (rank 0's), not one per rank.
            progress=config.progress and (not launch.merge or rank == 0),
            chat_template=chat_template,
            metadata={META_REFERENCE_MODEL: config.model},
            preview=None if preview is None else shard_path(preview, rank, world),
            overwrite=config.overwrite,
            log=log,
        )
    weighting = config.weighting()
    if weighting is not None:
        from drift_engine.weighting import attach_weights

        # Group-normalised weights: every prompt group lies in one shard.
        rollouts = attach_weights(rollouts, weighting)
    max_shard_bytes = config.max_shard_bytes
    written = save_rollouts(path, rollouts, max_shard_bytes=None if world > 1 else max_shard_bytes)

    if not launch.merge:
        discard_parts(parts_folder(path))
        echo(
            f"{rollouts.num_trajectories} trajectories of {len(problem_list)} problems "
            f"(shard {rank}/{world}), {rollouts.num_tokens} tokens -> {written[-1]}"
        )
        for line in summary_lines(rollouts):
            echo(line)
        if world > 1:
            pattern = out_path.with_name(f"{out_path.stem}.rank*-of-{world:05d}{out_path.suffix}")
            echo(f"merge all shards with: drift-engine rollout --merge {pattern} --out {out_path}")
        return rollouts

    wait_for_shards(launch)
    if rank != 0:
        return None
    delete = not config.keep_shards  # a torchrun run deletes its shards unless told
    merged, written = merge_rollout_shards(
        [shard_path(out_path, r, world) for r in range(world)],
        out_path,
        delete_shards=delete,
        max_shard_bytes=max_shard_bytes,
    )
    if preview is not None:
        pieces = [shard_path(preview, r, world) for r in range(world)]
        merge_text_pieces(pieces, preview, delete=delete)
    for r in range(world):
        discard_parts(parts_folder(shard_path(out_path, r, world)))
    echo(
        f"{merged.num_trajectories} trajectories of {len(problem_list)} problems "
        f"({world} ranks), {merged.num_tokens} tokens -> {written[-1]}"
    )
    for line in summary_lines(merged):
        echo(line)
    return merged


def _merge_files(config: RolloutConfig, echo: Callable[[str], None]) -> RolloutSet:
    """Merge the shard files of a sharded run (kept unless ``keep_shards`` is False)."""
    from drift_engine.rollout.shards import merge_rollout_shards, problem_count, summary_lines

    merged, written = merge_rollout_shards(
        config.shards,
        Path(config.out),
        delete_shards=config.keep_shards is False,
        max_shard_bytes=config.max_shard_bytes,
    )
    problems = problem_count(merged)
    of_problems = "" if problems is None else f" of {problems} problems"
    echo(
        f"{merged.num_trajectories} trajectories{of_problems} from {len(config.shards)} shard "
        f"files, {merged.num_tokens} tokens -> {written[-1]}"
    )
    for line in summary_lines(merged):
        echo(line)
    return merged
