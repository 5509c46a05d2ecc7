"""``drift-engine rollout``: sample multi-turn trajectories into rollouts.safetensors.

Sharded runs give each process a contiguous block of the prompts; each writes
``<out stem>.rank<r>-of-<w>.safetensors``. Under ``torchrun --nproc-per-node N -m
drift_engine rollout ...`` rank 0 then merges the shards into ``--out``; processes started
with explicit ``--shard-rank/--shard-world`` leave their shards for
``drift-engine rollout --merge SHARD... --out FILE`` (see ``drift_engine.rollout.shards``).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from drift_engine.cli.options import weighting_options
from drift_engine.errors import ConfigError
from drift_engine.train.config import DTypeName
from drift_engine.weighting_config import from_gamma_beta


def problem_options(*, env_required: bool):
    """Options shared by ``rollout`` and ``eval``."""

    def decorate(f):
        return _problem_options(f, env_required)

    return decorate


def _problem_options(f, env_required: bool):
    f = click.option(
        "--field",
        "fields",
        multiple=True,
        metavar="NAME=FILE_FIELD",
        help="Read the environment's field NAME from FILE_FIELD of each record (repeatable).",
    )(f)
    f = click.option(
        "--env-opt",
        "env_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Environment constructor option (repeatable; VALUE parsed as JSON when it can be).",
    )(f)
    f = click.option(
        "--env",
        "env_spec",
        required=env_required,
        help="Built-in (math, choice, guess) or package.module:Class.",
    )(f)
    f = click.option("--limit", type=int, help="Use only the first N problems.")(f)
    f = click.option(
        "--split", default="test", show_default=True, help="Split of a hf:NAME dataset."
    )(f)
    f = click.option(
        "--chat-template",
        "chat_template_file",
        type=click.Path(),
        help="Jinja chat template file, for tokenizers that have none.",
    )(f)
    f = click.option("--max-new-tokens", type=int, default=512, show_default=True)(f)
    f = click.option(
        "--engine",
        "engine_kind",
        type=click.Choice(["auto", "hf", "vllm"]),
        default="auto",
        show_default=True,
        help="auto: vLLM when installed and a GPU is visible, else Hugging Face generate.",
    )(f)
    f = click.option("--tensor-parallel-size", type=int, default=1, show_default=True)(f)
    f = click.option(
        "--batch-size", type=int, default=64, show_default=True, help="HF engine batch size."
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(get_args(DTypeName)),
        default="auto",
        show_default=True,
        help="Model dtype (auto, bfloat16, float32 ...); auto is float32 on a CPU, the "
        "model's own on a GPU. Recorded in the output's metadata (model_dtype).",
    )(f)
    f = click.option(
        "--max-model-len",
        type=int,
        help="Context limit in tokens (prompt and answers) of either engine [default: the "
        "model's]. Trajectories that reach it end cleanly (rollout counts them in its "
        "summary; eval scores them as unsolved).",
    )(f)
    f = click.option(
        "--gpu-memory-utilization",
        type=float,
        help="vLLM: fraction of the GPU's memory (on a CPU: of the machine's) to reserve "
        "[default: 0.9 on a GPU; on a CPU a 1 GiB KV cache instead].",
    )(f)
    f = click.option(
        "--enforce-eager/--no-enforce-eager",
        default=None,
        help="vLLM: run eagerly, without compilation or CUDA graphs [default: on a CPU only].",
    )(f)
    f = click.option(
        "--vllm-arg",
        "vllm_args",
        multiple=True,
        metavar="KEY=VALUE",
        help="vLLM: any other vllm.LLM argument, e.g. kv_cache_memory_bytes=4000000000 "
        "(repeatable; VALUE parsed as JSON when it can be).",
    )(f)
    return f


env_and_problem_options = problem_options(env_required=True)


@click.command("rollout")
@click.argument("shards", nargs=-1, type=click.Path())
@click.option(
    "--merge",
    is_flag=True,
    help="Merge the SHARDS of a sharded run into --out instead of sampling.",
)
@click.option("--model", help="Reference policy: a local folder or a Hugging Face id.")
@click.option(
    "--problems",
    help="JSONL problem file (one JSON object per line) or hf:NAME for a Hugging Face dataset.",
)
@click.option("--out", required=True, type=click.Path(), help="Output rollouts.safetensors.")
@click.option(
    "-n",
    "--n",
    "n",
    type=int,
    default=16,
    show_default=True,
    # torchrun's own parser takes "--n" for an abbreviation of its options: use -n there.
    help="Trajectories per prompt (write -n N under torchrun).",
)
@click.option("--max-turns", type=int, default=5, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--logprobs/--no-logprobs",
    default=True,
    show_default=True,
    help="Store sampled-token log-probs.",
)
@click.option("--preview", type=click.Path(), help="Also write a human-readable JSONL preview.")
@weighting_options(
    effect="stores returns and weights computed from the rewards",
    unset="no weights are stored (train computes them)",
)
@click.option(
    "--shard-rank",
    type=int,
    show_default="torchrun's RANK, and rank 0 merges",
    help="With --shard-world: write only this shard, to merge later with --merge.",
)
@click.option(
    "--shard-world",
    type=int,
    show_default="torchrun's WORLD_SIZE, else 1",
    help="Number of shards.",
)
@click.option(
    "--keep-shards/--delete-shards",
    default=None,
    show_default="delete after a torchrun run, keep with --merge",
    help="Keep or delete the shard files (and preview pieces) once merged.",
)
@click.option(
    "--max-shard-mb",
    type=float,
    help="Write --out as a sharded set of files of at most this many MB (read as one set).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out (and --preview); without it they are refused.",
)
@click.option(
    "--save-every",
    "prompts_per_part",
    type=int,
    default=256,
    show_default=True,
    metavar="PROMPTS",
    help="Write finished trajectories to <out>.partial/ every PROMPTS prompts; a rerun with "
    "the same settings continues from there.",
)
@click.option(
    "--progress/--no-progress",
    " /--quiet",
    default=True,
    show_default=True,
    help="Progress bar of the sampling (--quiet: --no-progress).",
)
@problem_options(env_required=False)
def rollout(
    shards: tuple[str, ...],
    merge: bool,
    model: str | None,
    problems: str | None,
    out: str,
    n: int,
    max_turns: int,
    temperature: float,
    top_p: float,
    seed: int,
    logprobs: bool,
    preview: str | None,
    gamma: float | None,
    beta: float | None,
    shard_rank: int | None,
    shard_world: int | None,
    keep_shards: bool | None,
    max_shard_mb: float | None,
    overwrite: bool,
    prompts_per_part: int,
    progress: bool,
    env_spec: str | None,
    env_options: tuple[str, ...],
    fields: tuple[str, ...],
    limit: int | None,
    split: str,
    chat_template_file: str | None,
    max_new_tokens: int,
    engine_kind: str,
    tensor_parallel_size: int,
    batch_size: int,
    dtype: str,
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    enforce_eager: bool | None,
    vllm_args: tuple[str, ...],
) -> None:
    """Sample N trajectories per problem, up to MAX_TURNS turns each, from a reference model.

    With --merge: merge the SHARDS written by a sharded run (e.g. one process per GPU
    started with --shard-rank/--shard-world) into --out.
    """
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out!r}.")
    if max_shard_mb is not None and max_shard_mb <= 0:
        raise ConfigError(f"--max-shard-mb must be positive, got {max_shard_mb}.")
    max_shard_bytes = None if max_shard_mb is None else int(max_shard_mb * 1024 * 1024)
    from drift_engine.data.rollouts import check_output_file

    if merge:
        check_output_file(out_path, overwrite=overwrite)
        _merge_only(shards, out_path, keep_shards is not False, max_shard_bytes)
        return
    if shards:
        raise ConfigError(
            f"unexpected arguments {list(shards)}: shard files are given with --merge only."
        )
    missing = [
        name
        for name, value in (("--model", model), ("--problems", problems), ("--env", env_spec))
        if value is None
    ]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (needed unless --merge is given).")
    if prompts_per_part < 1:
        raise ConfigError(f"--save-every must be at least 1 prompt, got {prompts_per_part}.")

    from drift_engine.data.rollouts import META_REFERENCE_MODEL, save_rollouts
    from drift_engine.envs import load_environment, load_problems, parse_field_mapping
    from drift_engine.rollout import (
        ChatFormatter,
        SamplingParams,
        create_engine,
        load_tokenizer,
        padding_token_id,
    )
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

    launch = shard_launch(shard_rank, shard_world)
    rank, world = launch.rank, launch.world
    # Outputs are checked before any work: a torchrun run writes --out (its rank files are
    # its own intermediates), a shard of a run merged later writes its shard file.
    final = out_path if launch.merge else shard_path(out_path, rank, world)
    check_output_file(final, overwrite=overwrite)
    if preview is not None:
        preview_final = Path(preview) if launch.merge else shard_path(Path(preview), rank, world)
        check_output_file(preview_final, overwrite=overwrite, option="--preview")
    from drift_engine.rollout.chat import read_chat_template
    from drift_engine.rollout.engine import engine_settings, parse_env_options

    env = load_environment(env_spec, **parse_env_options(env_options))
    problem_list = load_problems(
        problems, fields=parse_field_mapping(fields), env=env, limit=limit, split=split
    )
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, logprobs=logprobs
    )
    tokenizer = load_tokenizer(model)
    chat_template = read_chat_template(chat_template_file)
    ChatFormatter(tokenizer, chat_template)  # fail on a missing template before loading weights

    device = None
    if launch.local_rank is not None:
        # vLLM uses every GPU it can see, so each torchrun process gets its own before CUDA
        # starts (the check for a GPU in "auto" would start it); HF takes cuda:LOCAL_RANK.
        if engine_kind == "vllm" or (engine_kind == "auto" and vllm_available()):
            pin_visible_gpus(launch.local_rank, tensor_parallel_size)
        else:
            device = process_device(launch.local_rank)
    engine = create_engine(
        engine_kind,
        model,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        device=device,
        max_batch_size=batch_size,
        seed=seed,
        pad_token_id=padding_token_id(tokenizer),
        **engine_settings(max_model_len, gpu_memory_utilization, enforce_eager, vllm_args),
    )
    path = shard_path(out_path, rank, world)
    preview_path = None if preview is None else shard_path(Path(preview), rank, world)
    with engine:  # closed before rank 0 waits for the other shards
        rollouts = collect_in_parts(
            engine,
            tokenizer,
            env,
            problem_list,
            parts_folder(path),
            n=n,
            max_turns=max_turns,
            sampling=sampling,
            seed=seed,
            shard_rank=rank,
            shard_world=world,
            prompts_per_part=prompts_per_part,
            # One progress bar per torchrun job (rank 0's), not one per rank.
            progress=progress and (not launch.merge or rank == 0),
            chat_template=chat_template,
            metadata={META_REFERENCE_MODEL: model},
            preview=preview_path,
            overwrite=overwrite,
            log=lambda line: click.echo(line, err=True),
        )
    weighting = from_gamma_beta(gamma, beta)
    if weighting is not None:
        from drift_engine.weighting import attach_weights

        # Group-normalised weights: every prompt group lies in one shard.
        rollouts = attach_weights(rollouts, weighting)
    written = save_rollouts(path, rollouts, max_shard_bytes=None if world > 1 else max_shard_bytes)

    if not launch.merge:
        discard_parts(parts_folder(path))
        click.echo(
            f"{rollouts.num_trajectories} trajectories of {len(problem_list)} problems "
            f"(shard {rank}/{world}), {rollouts.num_tokens} tokens -> {written[-1]}"
        )
        for line in summary_lines(rollouts):
            click.echo(line)
        if world > 1:
            pattern = out_path.with_name(f"{out_path.stem}.rank*-of-{world:05d}{out_path.suffix}")
            click.echo(f"merge all shards with: drift-engine rollout --merge {pattern} --out {out}")
        return

    wait_for_shards(launch)
    if rank != 0:
        return
    merged, written = merge_rollout_shards(
        [shard_path(out_path, r, world) for r in range(world)],
        out_path,
        delete_shards=not keep_shards,
        max_shard_bytes=max_shard_bytes,
    )
    if preview is not None:
        pieces = [shard_path(Path(preview), r, world) for r in range(world)]
        merge_text_pieces(pieces, preview, delete=not keep_shards)
    for r in range(world):
        discard_parts(parts_folder(shard_path(out_path, r, world)))
    click.echo(
        f"{merged.num_trajectories} trajectories of {len(problem_list)} problems "
        f"({world} ranks), {merged.num_tokens} tokens -> {written[-1]}"
    )
    for line in summary_lines(merged):
        click.echo(line)


def _merge_only(
    shards: tuple[str, ...], out: Path, keep_shards: bool, max_shard_bytes: int | None
) -> None:
    from click.core import ParameterSource

    from drift_engine.rollout.shards import merge_rollout_shards, problem_count, summary_lines

    ctx = click.get_current_context()
    merge_options = {
        "shards",
        "merge",
        "out",
        "keep_shards",
        "max_shard_mb",
        "progress",
        "overwrite",
    }
    extra = [
        "--" + name.replace("_", "-")
        for name in ctx.params
        if name not in merge_options
        and ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    ]
    if extra:
        raise ConfigError(
            "--merge only takes shard files, --out, --overwrite, --keep-shards/--delete-shards "
            f"and --max-shard-mb; got {', '.join(extra)}."
        )
    if not shards:
        raise ConfigError("--merge needs the shard files to merge.")
    merged, written = merge_rollout_shards(
        shards, out, delete_shards=not keep_shards, max_shard_bytes=max_shard_bytes
    )
    problems = problem_count(merged)
    of_problems = "" if problems is None else f" of {problems} problems"
    click.echo(
        f"{merged.num_trajectories} trajectories{of_problems} from {len(shards)} shard files, "
        f"{merged.num_tokens} tokens -> {written[-1]}"
    )
    for line in summary_lines(merged):
        click.echo(line)
