"""multi@k evaluation: greedy decoding, up to K turns with the environment's feedback.

multi@k is the fraction of problems whose first correct answer comes at turn <= k
(k = 1..K); multi@1 is ordinary single-turn accuracy and multi@K counts every problem the
policy solves within the turn budget.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drift_engine.envs import Environment, environment_spec
from drift_engine.envs.base import Problem
from drift_engine.rollout.engine import Engine, SamplingParams
from drift_engine.rollout.loop import collect_trajectories


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
    *,
    max_new_tokens: int = 512,
    chat_template: str | None = None,
    progress: bool = False,
    model: str = "",
    benchmark: str = "",
) -> MultiAtKResult:
    """Greedy multi-turn episodes (one per problem) and their multi@1..K."""
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
    return result


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
