"""multi@k: a scripted policy with known first-correct turns, outputs, and the eval CLI."""

from __future__ import annotations

import json

import pytest
from factories import PROBLEMS, ScriptedEngine, build_tokenizer, save_tiny_model

from drift_engine.envs import load_environment
from drift_engine.evaluate import (
    MultiAtKResult,
    evaluate_multi_at_k,
    format_table,
    plot_multi_at_k,
    write_benchmark_json,
)
from drift_engine.rollout import SamplingParams

# Problem "1" solved at turn 1, "2" at turn 3, "3" never (5 problems below: 2 more unsolved).
SCRIPT = {
    ("1", 1): "<answer> 3 </answer>",
    ("2", 1): "<answer> 5 </answer>",
    ("2", 2): "garbled",
    ("2", 3): "<answer> 4 </answer>",
    ("3", 1): "<answer> 1 </answer>",
}
EXTRA = [
    {"question": "What is 5 plus 5 ?", "answer": "10"},
    {"question": "What is 6 plus 1 ?", "answer": "7"},
]


def test_multi_at_k_on_scripted_policy():
    tokenizer = build_tokenizer()
    engine = ScriptedEngine(tokenizer, {**SCRIPT, ("6", 2): "<answer> 7 </answer>"})
    result = evaluate_multi_at_k(
        engine,
        tokenizer,
        load_environment("math"),
        PROBLEMS + EXTRA,
        max_turns=4,
        model="scripted",
        benchmark="toy",
    )
    assert result.first_correct_turn == [1, 3, None, None, 2]
    assert result.multi_at_k == pytest.approx([1 / 5, 2 / 5, 3 / 5, 3 / 5])
    assert result.at(1) == pytest.approx(0.2) and result.num_problems == 5
    assert result.env == "math"
    # greedy and one trajectory per problem
    assert engine.calls[0] == 5


def test_multi_at_k_is_monotone_and_roundtrips_json(tmp_path):
    result = MultiAtKResult.from_first_correct([2, None, 1, 1], 3, model="m", benchmark="b")
    assert result.multi_at_k == [0.5, 0.75, 0.75]
    path = write_benchmark_json([result], tmp_path / "b.json")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "b" and data["results"][0]["multi_at_k"]["2"] == 0.75
    assert MultiAtKResult.from_json(data["results"][0]) == result


def test_table_and_plot(tmp_path):
    a = MultiAtKResult.from_first_correct([1, 2, None, None], 2, model="ref", benchmark="b")
    b = MultiAtKResult.from_first_correct([1, 1, 2, None], 2, model="drift", benchmark="b")
    table = format_table([a, b])
    assert table.splitlines()[0] == "| model | benchmark | multi@1 | multi@2 |"
    assert "| ref | b | 25.0 | 50.0 |" in table and "| drift | b | 50.0 | 75.0 |" in table
    png = plot_multi_at_k([a, b], tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_ignores_sampling_randomness():
    tokenizer = build_tokenizer()
    seen = []

    class Recording(ScriptedEngine):
        def generate(self, prompts, params, seeds):
            seen.append(params)
            return super().generate(prompts, params, seeds)

    evaluate_multi_at_k(
        Recording(tokenizer, SCRIPT), tokenizer, load_environment("math"), PROBLEMS, 2
    )
    assert all(isinstance(p, SamplingParams) and p.greedy for p in seen)


def test_cli_eval_two_models(tmp_path):
    import shutil

    from click.testing import CliRunner

    from drift_engine.cli import cli

    first = save_tiny_model(tmp_path / "a" / "policy")
    second = shutil.copytree(first, tmp_path / "b" / "policy")  # same name: labels stay distinct
    problems = tmp_path / "toy.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:2]))
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "--model",
            str(first),
            "--model",
            str(second),
            "--env",
            "math",
            "--problems",
            str(problems),
            "--max-turns",
            "2",
            "--max-new-tokens",
            "4",
            "--engine",
            "hf",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "toy.json").read_text())
    assert [r["model"] for r in data["results"]] == ["policy", "policy-2"]
    # identical weights, greedy decoding: identical results
    assert data["results"][0]["first_correct_turn"] == data["results"][1]["first_correct_turn"]
    assert (out / "toy.png").exists() and "multi@2" in (out / "toy.md").read_text()


def test_cli_eval_bad_input_exits_2(tmp_path):
    from click.testing import CliRunner

    from drift_engine.cli import cli

    (tmp_path / "empty.jsonl").write_text("")
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            "--model",
            str(tmp_path),
            "--env",
            "math",
            "--problems",
            str(tmp_path / "empty.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "error:" in result.output and "empty" in result.output
