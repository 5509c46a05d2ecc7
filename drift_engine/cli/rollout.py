"""``drift-engine rollout``: sample multi-turn trajectories into rollouts.safetensors.

Sharded runs (``torchrun --nproc-per-node N -m drift_engine rollout ...`` or explicit
``--shard-rank/--shard-world``) give each process a contiguous block of the prompts and
write ``<out stem>.rank<r>-of-<w>.safetensors``; ``load_rollouts([...], group_ids="keep")``
merges them (group ids are global prompt indices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from drift_engine.errors import ConfigError


def parse_env_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``("low=1", "name=x")`` → ``{"low": 1, "name": "x"}`` (values parsed as JSON if they can be)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"environment option {item!r} must look like KEY=VALUE.")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the chat template file {path!r}: {err}") from None


def shard_output_path(out: Path, rank: int, world: int) -> Path:
    if world == 1:
        return out
    return out.with_name(f"{out.stem}.rank{rank:05d}-of-{world:05d}{out.suffix}")


def env_and_problem_options(f):
    """Options shared by ``rollout`` and ``eval``."""
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
        required=True,
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
        default="auto",
        show_default=True,
        help="Model dtype (auto, bfloat16, float32 ...).",
    )(f)
    return f


@click.command("rollout")
@click.option(
    "--model", required=True, help="Reference policy: a local folder or a Hugging Face id."
)
@click.option(
    "--problems",
    required=True,
    help="JSONL problem file (one JSON object per line) or hf:NAME for a Hugging Face dataset.",
)
@click.option("--out", required=True, type=click.Path(), help="Output rollouts.safetensors.")
@click.option("--n", type=int, default=16, show_default=True, help="Trajectories per prompt.")
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
@click.option(
    "--gamma",
    type=float,
    help="With --beta: store returns and weights computed with this discount.",
)
@click.option("--beta", type=float, help="With --gamma: weight temperature of the stored weights.")
@click.option(
    "--shard-rank", type=int, help="This process's shard (default: torchrun's RANK, else 0)."
)
@click.option(
    "--shard-world", type=int, help="Number of shards (default: torchrun's WORLD_SIZE, else 1)."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@env_and_problem_options
def rollout(
    model: str,
    problems: str,
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
    quiet: bool,
    env_spec: str,
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
) -> None:
    """Sample N trajectories per problem, up to MAX_TURNS turns each, from a reference model."""
    from drift_engine.data.rollouts import META_REFERENCE_MODEL, save_rollouts
    from drift_engine.envs import load_environment, load_problems, parse_field_mapping
    from drift_engine.rollout import (
        ChatFormatter,
        SamplingParams,
        collect_trajectories,
        create_engine,
        format_turn_stats,
        load_tokenizer,
        shard_from_env,
        to_rollout_set,
        turn_stats,
        write_preview,
    )

    if (gamma is None) != (beta is None):
        raise ConfigError("give --gamma and --beta together (or neither, to weight later).")
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {out!r}.")
    env_rank, env_world = shard_from_env()
    rank = env_rank if shard_rank is None else shard_rank
    world = env_world if shard_world is None else shard_world

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
    engine = create_engine(
        engine_kind,
        model,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        max_batch_size=batch_size,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    run = collect_trajectories(
        engine,
        tokenizer,
        env,
        problem_list,
        n=n,
        max_turns=max_turns,
        sampling=sampling,
        seed=seed,
        shard_rank=rank,
        shard_world=world,
        progress=not quiet,
        chat_template=chat_template,
    )
    rollouts = to_rollout_set(run, {META_REFERENCE_MODEL: model})
    if gamma is not None:
        from drift_engine.weighting import WeightingConfig, attach_weights

        rollouts = attach_weights(rollouts, WeightingConfig(gamma=gamma, beta=beta))
    path = shard_output_path(out_path, rank, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = save_rollouts(path, rollouts)
    if preview:
        preview_path = Path(preview)
        if world > 1:
            preview_path = preview_path.with_name(
                f"{preview_path.stem}.rank{rank:05d}-of-{world:05d}{preview_path.suffix}"
            )
        write_preview(run, preview_path)
    click.echo(
        f"{len(run.trajectories)} trajectories of {len(problem_list)} problems "
        f"(shard {rank}/{world}), {rollouts.num_tokens} tokens -> {written[-1]}"
    )
    click.echo(format_turn_stats(turn_stats(run.trajectories, max_turns)))
    click.echo(run.report.summary())
