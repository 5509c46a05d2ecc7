"""multi@k evaluation: greedy decoding, up to K turns with the environment's feedback.

multi@k is the fraction of problems whose first correct answer comes at turn <= k
(k = 1..K); multi@1 is ordinary single-turn accuracy and multi@K counts every problem the
policy solves within the turn budget.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drift_engine.envs import Environment, environment_spec
from drift_engine.envs.base import Problem
from drift_engine.errors import ConfigError
from drift_engine.evaluate_config import EvalConfig
from drift_engine.rollout.engine import Engine, SamplingParams
from drift_engine.rollout.loop import RolloutRun, collect_trajectories


@dataclass
class MultiAtKResult:
    """multi@k of one policy on one benchmark."""

    max_turns: int
    first_correct_turn: list[int | None]  # per problem; None = not solved within max_turns
    multi_at_k: list[float]  # index k-1 holds multi@k
    num_problems: int
    model: str = ""
    benchmark: str = ""
    env: str = ""
    scoring_errors: int = 0  # answers the environment could not score (reward 0)

    @classmethod
    def from_first_correct(
        cls, first_correct_turn: Sequence[int | None], max_turns: int, **labels: str
    ) -> MultiAtKResult:
        n = len(first_correct_turn)
        multi = [
            sum(t is not None and t <= k for t in first_correct_turn) / n if n else 0.0
            for k in range(1, max_turns + 1)
        ]
        return cls(max_turns, list(first_correct_turn), multi, n, **labels)

    def at(self, k: int) -> float:
        return self.multi_at_k[k - 1]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["multi_at_k"] = {str(k): v for k, v in enumerate(self.multi_at_k, start=1)}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MultiAtKResult:
        multi = data["multi_at_k"]
        values = (
            [multi[str(k)] for k in range(1, len(multi) + 1)] if isinstance(multi, dict) else multi
        )
        return cls(
            max_turns=int(data["max_turns"]),
            first_correct_turn=list(data["first_correct_turn"]),
            multi_at_k=[float(v) for v in values],
            num_problems=int(data["num_problems"]),
            model=data.get("model", ""),
            benchmark=data.get("benchmark", ""),
            env=data.get("env", ""),
            scoring_errors=int(data.get("scoring_errors", 0)),
        )


def evaluate_multi_at_k(
    engine: Engine,
    tokenizer: Any,
    env: Environment,
    problems: Sequence[Problem],
    max_turns: int,
    **options: Any,
) -> MultiAtKResult:
    """Greedy multi-turn episodes (one per problem) and their multi@1..K; ``options`` are
    those of :func:`evaluate_episodes` (``max_new_tokens``, ``chat_template``, ``progress``,
    ``model``, ``benchmark``)."""
    result, _ = evaluate_episodes(engine, tokenizer, env, problems, max_turns, **options)
    return result


def evaluate_episodes(
    engine: Engine,
    tokenizer: Any,
    env: Environment,
    problems: Sequence[Problem],
    max_turns: int,
    *,
    max_new_tokens: int = 512,
    chat_template: str | None = None,
    progress: bool = False,
    model: str = "",
    benchmark: str = "",
) -> tuple[MultiAtKResult, RolloutRun]:
    """Greedy multi-turn episodes (one per problem): their multi@1..K and the episodes
    themselves (e.g. for a preview)."""
    run = collect_trajectories(
        engine,
        tokenizer,
        env,
        problems,
        n=1,
        max_turns=max_turns,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
        seed=0,
        progress=progress,
        chat_template=chat_template,
    )
    first = [t.first_correct_turn for t in run.trajectories]  # one per problem, in order
    result = MultiAtKResult.from_first_correct(
        first, max_turns, model=model, benchmark=benchmark, env=environment_spec(env)
    )
    result.scoring_errors = sum(len(t.scoring_errors) for t in run.trajectories)
    return result, run


def format_table(results: Sequence[MultiAtKResult]) -> str:
    """A Markdown table: one row per result, one column per k."""
    if not results:
        return ""
    max_turns = max(r.max_turns for r in results)
    header = (
        "| model | benchmark | " + " | ".join(f"multi@{k}" for k in range(1, max_turns + 1)) + " |"
    )
    rule = "|---|---|" + "---:|" * max_turns
    rows = []
    for r in results:
        cells = [
            f"{100 * r.at(k):.1f}" if k <= r.max_turns else "" for k in range(1, max_turns + 1)
        ]
        rows.append(f"| {r.model} | {r.benchmark} | " + " | ".join(cells) + " |")
    notes = [
        f"{r.model} on {r.benchmark}: {r.scoring_errors} answers could not be scored (reward 0)"
        for r in results
        if r.scoring_errors
    ]
    return "\n".join([header, rule, *rows, *(["", *notes] if notes else [])])


def plot_multi_at_k(
    results: Sequence[MultiAtKResult], path: str | os.PathLike, title: str | None = None
) -> Path:
    """A PNG of multi@k against k, one line per result (e.g. several models)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for r in results:
        ks = list(range(1, r.max_turns + 1))
        ax.plot(ks, [100 * v for v in r.multi_at_k], marker="o", label=r.model or "policy")
    ax.set_xlabel("k (turns)")
    ax.set_ylabel("multi@k (%)")
    ax.set_xticks(range(1, max((r.max_turns for r in results), default=1) + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or (results[0].benchmark if results else "multi@k"))
    if results:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_benchmark_json(results: Sequence[MultiAtKResult], path: str | os.PathLike) -> Path:
    """One JSON file per benchmark holding every model's result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": results[0].benchmark if results else "",
        "results": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- a whole run


def benchmark_name(source: str) -> str:
    """A benchmark's name in its output files: a file's stem, or hf:ORG/NAME as ORG__NAME."""
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


def model_labels(models: Sequence[str], labels: Sequence[str]) -> list[str]:
    """One label per model: the --label values in order, else each folder's name
    (made unique with -2, -3, ...)."""
    models, labels = list(models), list(labels)
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
    return labels


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


def run_eval(config: EvalConfig) -> dict[str, list[MultiAtKResult]]:
    """Evaluate every model of ``config`` on every benchmark: {benchmark: one result per
    model, in order}, also written to ``<out>/<benchmark>.json``, ``.md`` (the table) and
    ``.png`` (multi@k vs k).

    Everything that can be checked is checked before a model loads (the configuration,
    --out, the labels, the environment and the problems). One engine at a time: each is
    closed (its processes and memory freed) before the next model loads."""
    from drift_engine.envs import load_environment, load_problems, parse_field_mapping
    from drift_engine.rollout import ChatFormatter, create_engine, load_tokenizer, padding_token_id
    from drift_engine.rollout.chat import read_chat_template
    from drift_engine.rollout.engine import engine_settings, parse_env_options

    config.validate()
    out_dir = Path(config.out)
    check_out_folder(out_dir, config.overwrite)
    names = model_labels(config.models, config.labels)
    env = load_environment(config.env, **parse_env_options(config.env_options))
    field_map = parse_field_mapping(config.fields)
    benchmarks: dict[str, list[Problem]] = {}
    for source in config.problems:
        name = benchmark_name(source)
        if name in benchmarks:
            raise ConfigError(f"two benchmarks are both named {name!r}; rename one of the files.")
        benchmarks[name] = load_problems(
            source, fields=field_map, env=env, limit=config.limit, split=config.split
        )
    chat_template = read_chat_template(config.chat_template)

    settings = engine_settings(
        config.max_model_len, config.gpu_memory_utilization, config.enforce_eager,
        config.vllm_args,
    )  # fmt: skip
    results: dict[str, list[MultiAtKResult]] = {name: [] for name in benchmarks}
    for model, label in zip(config.models, names, strict=True):
        tokenizer = load_tokenizer(model)
        ChatFormatter(tokenizer, chat_template)
        engine = create_engine(
            config.engine,
            model,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            max_batch_size=config.batch_size,
            pad_token_id=padding_token_id(tokenizer),
            **settings,
        )
        with engine:
            for name, problems in benchmarks.items():
                if config.progress:
                    print(f"{label} on {name} ({len(problems)} problems)", file=sys.stderr)
                result = evaluate_multi_at_k(
                    engine,
                    tokenizer,
                    env,
                    problems,
                    config.max_turns,
                    max_new_tokens=config.max_new_tokens,
                    chat_template=chat_template,
                    model=label,
                    benchmark=name,
                    progress=config.progress,
                )
                results[name].append(result)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        write_benchmark_json(rows, out_dir / f"{name}.json")
        (out_dir / f"{name}.md").write_text(format_table(rows) + "\n", encoding="utf-8")
        plot_multi_at_k(rows, out_dir / f"{name}.png", title=f"{name}: multi@k")
    return results
