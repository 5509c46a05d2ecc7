"""The embedded demo's pieces: tokenizer and chat template, the shipped toy model and the
other package assets, the toy-model build, and the whole pipeline at a reduced size
(outputs exist and are well-formed; whether DRIFT wins is the full demo's business, not a
test's). tests/test_wheel.py runs the demo from an installed wheel."""

import json
import random
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from drift_engine.assets import NAMES, asset_path
from drift_engine.cli import cli
from drift_engine.data.rollouts import load_rollouts
from drift_engine.demo import (
    IM_END,
    DemoConfig,
    ToyModelConfig,
    build_toy_model,
    build_toy_tokenizer,
    default_model_dir,
    encode_conversation,
    play_scripted_game,
    run_demo,
    split_secrets,
)
from drift_engine.envs import load_problems
from drift_engine.envs.guess import GuessNumberEnv, parse_guess
from drift_engine.errors import ConfigError
from drift_engine.train.config import load_config

SHIPPED = default_model_dir()

CONVERSATION = [
    {
        "role": "user",
        "content": "Guess my number between 1 and 32. Answer with <answer>number</answer>.",
    },
    {"role": "assistant", "content": "<answer>16</answer>"},
    {"role": "user", "content": "Higher."},
    {"role": "assistant", "content": "<answer>number</answer>"},
    {"role": "user", "content": "Answer with <answer>number</answer>."},
    {"role": "assistant", "content": "<answer>24</answer>"},
]


def _template_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def test_template_equals_concatenated_messages(tokenizer):
    ids, trained = encode_conversation(tokenizer, CONVERSATION)
    assert ids == _template_ids(tokenizer, CONVERSATION)
    # Trained tokens are exactly the assistant answers and their closing <|im_end|>.
    trained_text = tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert (
        trained_text.split()
        == (
            "<answer> 16 </answer> <|im_end|> <answer> number </answer> <|im_end|> "
            "<answer> 24 </answer> <|im_end|>"
        ).split()
    )
    assert tokenizer.unk_token_id not in ids


def test_prefix_plus_generation_prompt_is_a_prefix(tokenizer):
    """The rollout loop appends messages as token deltas: every prefix of the conversation
    with the generation prompt must be a token prefix of the whole conversation."""
    full = _template_ids(tokenizer, CONVERSATION)
    for cut in (1, 3, 5):
        prefix = _template_ids(tokenizer, CONVERSATION[:cut], add_generation_prompt=True)
        assert full[: len(prefix)] == prefix


def test_decoded_answers_round_trip(tokenizer):
    for answer in ("<answer>7</answer>", "<answer>number</answer>", "<answer>31"):
        ids = tokenizer.encode(answer + IM_END, add_special_tokens=False)
        text = tokenizer.decode(ids[:-1])
        assert tokenizer.encode(text, add_special_tokens=False) == ids[:-1]
        assert parse_guess(text) == parse_guess(answer)
    assert tokenizer.decode(
        tokenizer.encode("<answer>7</answer>" + IM_END), skip_special_tokens=True
    ).split() == ["<answer>", "7", "</answer>"]
    assert tokenizer.encode("banana", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_scripted_games_follow_the_rules():
    env = GuessNumberEnv(low=1, high=32)
    config = ToyModelConfig()
    rng = random.Random(0)
    for style in ("bisect", "step", "repeat", "random"):
        for _ in range(20):
            secret = rng.randint(1, 32)
            game = play_scripted_game(env, {"secret": secret}, style, config, rng)
            roles = [m["role"] for m in game]
            assert roles[0] == "user" and roles[1::2] == ["assistant"] * len(roles[1::2])
            answers = game[1::2]
            assert 1 <= len(answers) <= config.max_turns
            solved = [parse_guess(a["content"]) == secret for a in answers]
            assert not any(solved[:-1])  # a game stops at its first correct answer
            if not solved[-1]:
                assert len(answers) == config.max_turns


def test_split_secrets_is_a_seeded_partition():
    train, held_out = split_secrets(1, 32, 16, seed=0)
    assert sorted(train + held_out) == list(range(1, 33)) and len(held_out) == 16
    assert (train, held_out) == split_secrets(1, 32, 16, seed=0)
    assert held_out != split_secrets(1, 32, 16, seed=1)[1]
    with pytest.raises(ConfigError, match="num_eval"):
        split_secrets(1, 8, 8, seed=0)


def test_shipped_assets_are_found_through_the_package():
    import subprocess
    import sys

    import drift_engine

    package = Path(drift_engine.__file__).parent
    for name in NAMES:
        path = asset_path(name)
        assert path.exists() and path.is_relative_to(package), path
    assert SHIPPED == asset_path("guess-model") and (SHIPPED / "config.json").is_file()
    with pytest.raises(ConfigError, match="no shipped asset 'nope'"):
        asset_path("nope")

    # The example config is complete and valid apart from the paths a user gives.
    example = load_config(asset_path("train.toml"))
    assert example.model.name_or_path and example.data.path
    printed = subprocess.run(
        [sys.executable, "-m", "drift_engine.assets", "train.toml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == asset_path("train.toml").read_text()

    # The shipped problems are the demo's held-out split of the shipped model's game.
    info = json.loads((SHIPPED / "build_info.json").read_text())["config"]
    env = GuessNumberEnv(low=info["low"], high=info["high"])
    demo = DemoConfig()
    train, held_out = split_secrets(info["low"], info["high"], demo.num_eval, demo.split_seed)
    for name, secrets in (("train", train), ("eval", held_out)):
        problems = load_problems(str(asset_path(f"guess-problems/{name}.jsonl")), env=env)
        assert [p["secret"] for p in problems] == secrets


def test_shipped_model_loads_and_answers_in_format():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED).eval()
    info = json.loads((SHIPPED / "build_info.json").read_text())
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 2_000_000
    # Same tokenizer as the build code makes today: vocabulary and template.
    fresh = build_toy_tokenizer(info["config"]["max_number"])
    assert tokenizer.get_vocab() == fresh.get_vocab()
    assert _template_ids(tokenizer, CONVERSATION) == _template_ids(fresh, CONVERSATION)

    env = GuessNumberEnv(low=info["config"]["low"], high=info["config"]["high"])
    prompt = _template_ids(
        tokenizer, env.initial_messages({"secret": 3}), add_generation_prompt=True
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    guess = parse_guess(answer)
    assert guess is not None and 1 <= guess <= 32, answer


def test_build_toy_model_small(tmp_path):
    config = ToyModelConfig(
        num_games=48,
        epochs=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        batch_size=16,
        max_number=40,
    )
    lines = []
    out = build_toy_model(tmp_path / "toy", config, log=lines.append)
    info = json.loads((out / "build_info.json").read_text())
    assert info["config"]["num_games"] == 48 and info["final_pretraining_loss"] > 0
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if "epoch" in line]
    assert len(losses) == 2 and losses[1] < losses[0]  # pretraining learns something
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    unk = tokenizer.unk_token_id
    assert unk not in tokenizer.encode("0 40", add_special_tokens=False)  # numbers 0..max_number
    assert tokenizer.encode("41", add_special_tokens=False) == [unk]
    # Same seed, same weights.
    again = build_toy_model(tmp_path / "again", config, log=lambda _: None)
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_demo_pipeline_reduced(tmp_path):
    out = tmp_path / "demo"
    config = DemoConfig(num_eval=4, samples_per_prompt=2, steps=2, batch_tokens=256, grad_accum=1)
    result = run_demo(out, config, log=lambda _: None)

    names = [r.model for r in result.results]
    assert names == ["reference", "DRIFT", "rejection sampling"]
    report = json.loads((out / "results.json").read_text())
    k = report["max_turns"]
    for entry in report["results"]:
        values = [entry["multi_at_k"][str(i)] for i in range(1, k + 1)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values)  # multi@k never decreases with k
        assert entry["num_problems"] == 4 and len(entry["first_correct_turn"]) == 4
    assert len(report["eval_secrets"]) == 4 and not set(report["eval_secrets"]) & set(
        report["train_secrets"]
    )
    assert report["seconds"]["total"] > 0
    assert (out / "multi_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DRIFT |" in (out / "results.md").read_text()

    rollouts = load_rollouts(out / "rollouts.safetensors")
    assert rollouts.num_trajectories == 2 * 28 == report["rollouts"]["trajectories"]
    assert rollouts.weights is not None
    assert torch.isclose(rollouts.weights.mean(), torch.tensor(1.0), atol=1e-4)
    rejection = load_rollouts(out / "rollouts-rejection.safetensors")
    assert rejection.num_trajectories == report["rollouts"]["solved_trajectories"] > 0
    assert torch.equal(rejection.weights, torch.ones(rejection.num_trajectories))
    assert (torch.nan_to_num(rejection.turn_rewards) > 0).any(dim=1).all()
    for run in ("drift", "rejection"):
        assert list((out / run).glob("checkpoint-*/model/model.safetensors"))

    with pytest.raises(ConfigError, match="earlier run"):
        run_demo(out, config, log=lambda _: None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta", "0"], "beta must be > 0"),
        (["--gamma", "1.5"], "gamma must be in [0, 1]"),
        (["--rebuild-model", "--model", "m"], "--model or --rebuild-model"),
        (["--rebuild-model"], "exists from an earlier run"),
    ],
)
def test_cli_demo_checks_options_before_any_work(tmp_path, args, message):
    out = tmp_path / "o"
    (out / "drift").mkdir(parents=True)  # an earlier run's output
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == ["drift"]  # nothing built or written
    assert time.perf_counter() - started < 10


def test_cli_demo_reports_a_missing_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["demo", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none")]
    )
    assert result.exit_code == 2
    assert "no toy model" in result.output
    assert "--rebuild-model" in runner.invoke(cli, ["demo", "--help"]).output
