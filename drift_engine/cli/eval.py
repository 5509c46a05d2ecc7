"""``drift-engine eval``: multi@k of one or more models on one or more benchmarks.

Writes ``<out>/<benchmark>.json`` (every model's multi@1..K and per-problem first correct
turn), ``<out>/<benchmark>.md`` (the table) and ``<out>/<benchmark>.png`` (multi@k vs k).
An ``--out`` folder that already holds files is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

from pathlib import Path

import click

from drift_engine.cli.rollout import (
    engine_settings,
    env_and_problem_options,
    parse_env_options,
    read_chat_template,
)
from drift_engine.errors import ConfigError


def _benchmark_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:].replace("/", "__")
    return Path(source).stem


def _model_label(path: str, taken: set[str]) -> str:
    label = Path(path.rstrip("/")).name or path
    base, i = label, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def model_labels(models: tuple[str, ...], labels: tuple[str, ...]) -> list[str]:
    """One label per model: the --label values in order, else each folder's name
    (made unique with -2, -3, ...)."""
    if not labels:
        taken: set[str] = set()
        return [_model_label(model, taken) for model in models]
    if len(labels) != len(models):
        raise ConfigError(
            f"got {len(labels)} --label for {len(models)} --model; give one --label per "
            "--model, in the same order (or none, to label models by their folder names)."
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"--label {repeated[0]!r} is given twice; each model needs its own.")
    return list(labels)


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a file as --out, a folder with files in it (unless
    `overwrite`), and a place where the folder cannot be created or written."""
    from drift_engine.files import check_writable_location

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder.")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} already holds files (an earlier evaluation?); choose another "
            "folder or pass --overwrite to write over its results."
        )
    check_writable_location(out)


@click.command("eval")
@click.option(
    "--model",
    "models",
    required=True,
    multiple=True,
    help="Model folder or id (repeatable: compared).",
)
@click.option(
    "--problems",
    "problem_sources",
    required=True,
    multiple=True,
    help="Benchmark: JSONL file or hf:NAME (repeatable).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    show_default="the model folder's name",
    help="Name of the model in tables and plots, one per --model in the same order.",
)
@click.option("--max-turns", type=int, default=5, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option(
    "--overwrite", is_flag=True, help="Write into an --out folder that already holds files."
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bar of each model's episodes.",
)
@env_and_problem_options
def eval_command(
    models: tuple[str, ...],
    problem_sources: tuple[str, ...],
    labels: tuple[str, ...],
    max_turns: int,
    out: str,
    overwrite: bool,
    progress: bool,
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
    max_model_len: int | None,
    gpu_memory_utilization: float | None,
    enforce_eager: bool | None,
    vllm_args: tuple[str, ...],
) -> None:
    """Greedy multi-turn evaluation with feedback: multi@k for k = 1..MAX_TURNS."""
    from drift_engine.envs import load_environment, load_problems, parse_field_mapping
    from drift_engine.evaluate import (
        evaluate_multi_at_k,
        format_table,
        plot_multi_at_k,
        write_benchmark_json,
    )
    from drift_engine.rollout import (
        ChatFormatter,
        create_engine,
        load_tokenizer,
        padding_token_id,
    )

    if max_turns < 1:
        raise ConfigError(f"--max-turns must be at least 1, got {max_turns}.")
    out_dir = Path(out)
    check_out_folder(out_dir, overwrite)
    names = model_labels(models, labels)
    env = load_environment(env_spec, **parse_env_options(env_options))
    field_map = parse_field_mapping(fields)
    benchmarks = {}
    for source in problem_sources:
        name = _benchmark_name(source)
        if name in benchmarks:
            raise ConfigError(f"two benchmarks are both named {name!r}; rename one of the files.")
        benchmarks[name] = load_problems(
            source, fields=field_map, env=env, limit=limit, split=split
        )
    chat_template = read_chat_template(chat_template_file)

    settings = engine_settings(max_model_len, gpu_memory_utilization, enforce_eager, vllm_args)
    results = {name: [] for name in benchmarks}
    for model, label in zip(models, names, strict=True):
        tokenizer = load_tokenizer(model)
        ChatFormatter(tokenizer, chat_template)
        engine = create_engine(
            engine_kind,
            model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_batch_size=batch_size,
            pad_token_id=padding_token_id(tokenizer),
            **settings,
        )
        # One engine at a time: each is closed (its processes and memory freed) before the
        # next model loads.
        with engine:
            for name, problems in benchmarks.items():
                if progress:
                    click.echo(f"{label} on {name} ({len(problems)} problems)", err=True)
                result = evaluate_multi_at_k(
                    engine,
                    tokenizer,
                    env,
                    problems,
                    max_turns,
                    max_new_tokens=max_new_tokens,
                    chat_template=chat_template,
                    model=label,
                    benchmark=name,
                    progress=progress,
                )
                results[name].append(result)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        table = format_table(rows)
        write_benchmark_json(rows, out_dir / f"{name}.json")
        (out_dir / f"{name}.md").write_text(table + "\n", encoding="utf-8")
        plot_multi_at_k(rows, out_dir / f"{name}.png", title=f"{name}: multi@k")
        click.echo(f"\n{name} ({rows[0].num_problems} problems)\n{table}")
    click.echo(f"\nresults in {out_dir}")
