"""Rollout engines and the multi-turn loop on a tiny random model and a word-level tokenizer."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from factories import (
    PROBLEMS,
    ScriptedEngine,
    build_model,
    build_tokenizer,
    save_tiny_model,
)

from drift_engine.data.rollouts import RolloutSet, load_rollouts, save_rollouts
from drift_engine.envs import load_environment
from drift_engine.errors import ConfigError
from drift_engine.rollout import (
    ChatFormatter,
    Engine,
    SamplingParams,
    collect_trajectories,
    run_rollouts,
    shard_range,
    to_rollout_set,
)
from drift_engine.rollout.engine import request_limits
from drift_engine.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(tokenizer)


def test_hf_engine_logprobs_match_teacher_forcing_and_stop_trimming(tokenizer, model):
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, max_batch_size=8)
    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids([{"role": "user", "content": q["question"]}]) for q in PROBLEMS]
    prompts[1] = prompts[1][:5]  # different lengths: left padding is exercised
    stop = tokenizer.convert_tokens_to_ids("7")  # a frequent-enough token to stop on
    params = SamplingParams(
        temperature=1.0, max_new_tokens=12, stop_token_ids=(stop,), logprobs=True
    )
    generations = engine.generate(prompts, params, seeds=[1, 2, 3])
    for prompt, gen in zip(prompts, generations, strict=True):
        assert 1 <= len(gen.token_ids) <= 12
        assert stop not in gen.token_ids[:-1]  # trimmed right after the first stop token
        assert (gen.finish_reason == "stop") == (gen.token_ids[-1] == stop)
        ids = torch.tensor([prompt + gen.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float()  # (L, V)
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # (G, V)
        expected = logp.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=2e-5, rtol=1e-5)


def test_hf_engine_per_request_seeds_ignore_batch_composition(tokenizer, model):
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    formatter = ChatFormatter(tokenizer)
    prompts = [formatter.prompt_ids([{"role": "user", "content": q["question"]}]) for q in PROBLEMS]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    together = engine.generate(prompts, params, seeds=[11, 12, 13])
    alone = engine.generate(prompts[2:], params, seeds=[13])
    assert together[2].token_ids == alone[0].token_ids
    other_seed = engine.generate(prompts[2:], params, seeds=[14])
    again = engine.generate(prompts[2:], params, seeds=[13])
    assert again[0].token_ids == alone[0].token_ids
    assert other_seed[0].token_ids != alone[0].token_ids or len(alone[0].token_ids) < 3


def test_hf_engine_greedy_is_argmax(tokenizer, model):
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    prompt = ChatFormatter(tokenizer).prompt_ids([{"role": "user", "content": "What is 1 ?"}])
    (gen,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6), [0])
    ids = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen.token_ids == ids[len(prompt) :]


def test_request_limits_checks_a_generate_call():
    prompts, params = [[1, 2, 3], [4]], SamplingParams(max_new_tokens=5)
    assert request_limits(prompts, [0, 1], params, None, None) == [5, 5]
    assert request_limits(prompts, [0, 1], params, [2, 7], 10) == [2, 7]
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        request_limits(prompts, [0], params, None, None)
    with pytest.raises(ValueError, match="2 prompts but 1 token limits"):
        request_limits(prompts, [0, 1], params, [3], None)
    with pytest.raises(ValueError, match="at least 1"):
        request_limits(prompts, [0, 1], params, [3, 0], None)
    with pytest.raises(ConfigError, match="prompt 0 has 3 tokens and may generate 5"):
        request_limits(prompts, [0, 1], params, None, 7)


def test_sampling_params_validation():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1.0)


# ---- the loop -------------------------------------------------------------------------------


def test_rollout_tokens_equal_chat_template_of_final_conversation(tokenizer, model, tmp_path):
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    env = load_environment("math")
    run = collect_trajectories(
        engine,
        tokenizer,
        env,
        PROBLEMS[:2],
        n=2,
        max_turns=3,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=8, logprobs=True),
        seed=0,
        progress=False,
    )
    formatter = ChatFormatter(tokenizer)
    assert run.report.checked == 4 and run.report.mismatched == 0
    for traj in run.trajectories:
        assert traj.token_ids == formatter.conversation_ids(traj.messages)
        assistant = [m["content"] for m in traj.messages if m["role"] == "assistant"]
        assert len(assistant) == traj.num_turns == len(traj.rewards)
        for k, content in enumerate(assistant, start=1):
            turn_tokens = [
                t for t, turn in zip(traj.token_ids, traj.turn_ids, strict=True) if turn == k
            ]
            # the k-th assistant turn holds exactly the generated ids (content, maybe a stop)
            assert formatter.decode(turn_tokens).startswith(content)
        feedback = [m["content"] for m in traj.messages if m["role"] == "user"][1:]
        assert feedback == ["Incorrect. Please think again."] * (traj.num_turns - 1)
    rollouts = to_rollout_set(run)
    assert rollouts.behavior_logprobs is not None
    assert torch.all(rollouts.behavior_logprobs[rollouts.turn_ids == 0] == 0)
    assert torch.all(rollouts.behavior_logprobs[rollouts.turn_ids > 0] < 0)
    path = tmp_path / "r.safetensors"
    save_rollouts(path, rollouts)
    loaded = load_rollouts(path)
    assert torch.equal(loaded.input_ids, rollouts.input_ids)
    assert json.loads(loaded.metadata["sampling"])["n"] == 2
    assert loaded.metadata["env"] == "math"


def test_trajectories_stop_at_first_correct_turn_with_penalties(tokenizer):
    answers = {
        ("1", 1): "<answer> 3 </answer>",  # right at once
        ("2", 1): "<answer> 5 </answer>",
        ("2", 2): "no answer here",  # unparseable
        ("2", 3): "<answer> 4 </answer>",  # right at turn 3
        ("3", 1): "<answer> 6 </answer>",  # the same wrong answer every turn
        ("3", 2): "<answer> 6 </answer>",
        ("3", 3): "<answer> 6 </answer>",
    }
    engine = ScriptedEngine(tokenizer, answers)
    rollouts = run_rollouts(
        engine,
        tokenizer,
        load_environment("math"),
        PROBLEMS,
        n=2,
        max_turns=3,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=16),
        seed=0,
        progress=False,
    )
    assert engine.calls == [6, 4, 4]  # solved trajectories leave the batch
    assert rollouts.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert rollouts.num_turns().tolist() == [1, 1, 3, 3, 3, 3]
    rewards = rollouts.turn_rewards
    assert rewards[0, 0] == 1 and rewards.shape == (6, 3) and math.isnan(rewards[0, 1])
    assert rewards[2].tolist() == [0.0, 0.0, 1.0]
    assert rewards[4].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(rollouts.format_penalty, torch.tensor([0, 0, -0.1, -0.1, 0, 0]))
    # 3 identical answers: -0.5 * (1 - 1/3)
    torch.testing.assert_close(
        rollouts.repeat_penalty, torch.tensor([0, 0, 0, 0, -1 / 3, -1 / 3]), atol=1e-6, rtol=0
    )
    assert rollouts.behavior_logprobs is None


def test_sharded_rollout_equals_single_process(tokenizer, model):
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    env = load_environment("math")
    kwargs = dict(
        n=2,
        max_turns=2,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=6, logprobs=True),
        seed=3,
        progress=False,
    )
    single = run_rollouts(engine, tokenizer, env, PROBLEMS, **kwargs)
    shards = [
        run_rollouts(engine, tokenizer, env, PROBLEMS, shard_rank=r, shard_world=2, **kwargs)
        for r in range(2)
    ]
    assert [s.group_ids.tolist() for s in shards] == [[0, 0, 1, 1], [2, 2]]
    merged = RolloutSet.concat(shards, group_ids="keep")
    for name, tensor in single.tensors().items():
        torch.testing.assert_close(getattr(merged, name), tensor, equal_nan=True, atol=1e-5, rtol=0)
    assert list(shard_range(10, 2, 3)) == [7, 8, 9] and list(shard_range(10, 0, 3)) == [0, 1, 2, 3]
    # More shards than prompts: the last shards hold none, with the engine's context limit
    # (the HF engine always has one) as without.
    assert engine.max_model_len is not None
    empty = run_rollouts(engine, tokenizer, env, PROBLEMS, shard_rank=4, shard_world=5, **kwargs)
    assert empty.num_trajectories == 0


def test_tokenizer_without_chat_template_is_a_clear_error():
    tokenizer = build_tokenizer(chat_template=None)
    engine = ScriptedEngine(tokenizer, {})
    with pytest.raises(ConfigError, match="no chat template"):
        run_rollouts(
            engine,
            tokenizer,
            load_environment("math"),
            PROBLEMS,
            n=1,
            max_turns=1,
            sampling=SamplingParams(),
            seed=0,
            progress=False,
        )


def test_template_that_rewrites_history_is_reported(tokenizer):
    # Drops earlier assistant messages: the running ids cannot match the final template.
    template = (
        "{%- for message in messages %}{% if message['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    engine = ScriptedEngine(tokenizer, {("1", 1): "<answer> 2 </answer>"})
    with pytest.warns(UserWarning, match="differ from apply_chat_template"):
        run = collect_trajectories(
            engine,
            tokenizer,
            load_environment("math"),
            PROBLEMS[:1],
            n=1,
            max_turns=2,
            sampling=SamplingParams(),
            seed=0,
            progress=False,
            chat_template=template,
        )
    assert run.report.mismatched == 1 and run.report.first_position is not None


# ---- CLI --------------------------------------------------------------------------------


def _write_problems(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_rollout_writes_file_preview_and_summary(tmp_path):
    from click.testing import CliRunner

    from drift_engine.cli import cli

    model_dir = save_tiny_model(tmp_path / "model")
    problems = _write_problems(
        tmp_path / "p.jsonl", [{"q": r["question"], "a": r["answer"]} for r in PROBLEMS[:2]]
    )
    out = tmp_path / "out" / "roll.safetensors"
    args = [
        "rollout",
        "--model",
        str(model_dir),
        "--env",
        "math",
        "--problems",
        str(problems),
        "--field",
        "question=q",
        "--field",
        "answer=a",
        "--out",
        str(out),
        "--n",
        "2",
        "--max-turns",
        "2",
        "--max-new-tokens",
        "5",
        "--engine",
        "hf",
        "--quiet",
        "--preview",
        str(tmp_path / "preview.jsonl"),
        "--gamma",
        "0.9",
        "--beta",
        "0.1",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "token bookkeeping" in result.output
    rollouts = load_rollouts(out)
    assert rollouts.num_trajectories == 4 and rollouts.weights is not None
    assert rollouts.metadata["reference_model"] == str(model_dir)
    lines = (tmp_path / "preview.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["messages"][0]["role"] == "user"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--env": "nope"}, "unknown environment"),
        ({"--env": "no_such_module:Env"}, "cannot import"),
        ({"--problems": "EMPTY"}, "empty"),
        ({"--problems": "MISSING_FIELD"}, "answer"),
        ({"--model": "NO_TEMPLATE"}, "no chat template"),
        ({"--model": "TINY", "--dtype": "fp7"}, "'fp7' is not one of"),
    ],
)
def test_cli_rollout_bad_input_exits_2(tmp_path, change, message):
    from click.testing import CliRunner

    from drift_engine.cli import cli

    (tmp_path / "empty.jsonl").write_text("\n")
    _write_problems(tmp_path / "missing.jsonl", [{"question": "What is 1 ?"}])
    good = _write_problems(tmp_path / "p.jsonl", PROBLEMS[:1])
    options = {"--env": "math", "--problems": str(good), "--model": str(tmp_path / "m")}
    options.update(change)
    if options["--model"] == "NO_TEMPLATE":
        options["--model"] = str(save_tiny_model(tmp_path / "plain", chat_template=None))
    if options["--model"] == "TINY":
        options["--model"] = str(save_tiny_model(tmp_path / "tiny"))
    replacements = {"EMPTY": "empty.jsonl", "MISSING_FIELD": "missing.jsonl"}
    if options["--problems"] in replacements:
        options["--problems"] = str(tmp_path / replacements[options["--problems"]])
    args = ["rollout", "--out", str(tmp_path / "r.safetensors"), "--engine", "hf", "--quiet"]
    for key, value in options.items():
        args += [key, value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output


# ---- nothing already written is lost --------------------------------------------------------


class CrashAfter(Engine):
    """Delegates to ``engine``; the ``crash_at``-th generate call raises (a killed run)."""

    name = "hf"

    def __init__(self, engine, crash_at=None):
        self.engine, self.crash_at, self.prompts = engine, crash_at, []

    @property
    def max_model_len(self):
        return self.engine.max_model_len

    def generate(self, prompts, params, seeds, **limits):
        if self.crash_at is not None and len(self.prompts) + 1 >= self.crash_at:
            raise KeyboardInterrupt
        self.prompts.append(len(prompts))
        return self.engine.generate(prompts, params, seeds, **limits)

    def describe(self):
        return self.engine.describe()


def test_rollout_in_parts_survives_a_crash_and_resumes(tokenizer, model, tmp_path):
    from drift_engine.rollout.parts import collect_in_parts

    problems = [{"question": f"What is {i} plus 1 ?", "answer": str(i + 1)} for i in range(5)]
    env = load_environment("math")
    kwargs = dict(
        n=2,
        max_turns=2,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=5, logprobs=True),
        seed=4,
        progress=False,
        metadata={"reference_model": "tiny"},
    )
    hf = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    whole = run_rollouts(hf, tokenizer, env, problems, **kwargs)
    folder = tmp_path / "roll.safetensors.partial"
    parts = dict(prompts_per_part=2, preview=tmp_path / "p.jsonl")

    # Killed during the third part (2 turns per part): the first two parts are on disk.
    with pytest.raises(KeyboardInterrupt):
        collect_in_parts(CrashAfter(hf, 5), tokenizer, env, problems, folder, **kwargs, **parts)
    assert sorted(p.name for p in folder.glob("part-*.safetensors")) == [
        "part-00001.safetensors",
        "part-00002.safetensors",
    ]
    assert load_rollouts(folder / "part-00002.safetensors").group_ids.tolist() == [2, 2, 3, 3]

    # The rerun samples only the last part's prompt and gives the uninterrupted run's set.
    lines = []
    engine = CrashAfter(hf)
    got = collect_in_parts(
        engine, tokenizer, env, problems, folder, **kwargs, **parts, log=lines.append
    )
    assert (
        len(lines) == 1 and "resuming" in lines[0] and "2 of 3 parts (4 of 5 prompts)" in lines[0]
    )
    assert engine.prompts[0] == 2  # one prompt x n=2 in the first turn
    for name, tensor in whole.tensors().items():
        torch.testing.assert_close(getattr(got, name), tensor, equal_nan=True, atol=1e-5, rtol=0)
    assert got.metadata == whole.metadata  # per-part summaries add up
    previews = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in previews] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

    # Parts of a run with other settings are never mixed in.
    with pytest.raises(ConfigError, match="other settings \\(differs in seed\\).*--overwrite"):
        collect_in_parts(hf, tokenizer, env, problems, folder, **{**kwargs, "seed": 5}, **parts)
    again = collect_in_parts(
        hf, tokenizer, env, problems, folder, **{**kwargs, "seed": 5}, **parts, overwrite=True
    )
    assert json.loads((folder / "run.json").read_text())["seed"] == 5
    assert again.group_ids.tolist() == whole.group_ids.tolist()


def _cli(args):
    from click.testing import CliRunner

    from drift_engine.cli import cli

    return CliRunner().invoke(cli, args)


def test_cli_rollout_and_convert_check_out_before_any_work(tmp_path):
    problems = _write_problems(tmp_path / "p.jsonl", PROBLEMS[:1])
    existing = tmp_path / "done.safetensors"
    existing.write_bytes(b"hours of samples")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    # The model does not exist: every error below comes before anything is loaded.
    common = ["--model", str(tmp_path / "no-model"), "--env", "math", "--problems", str(problems)]
    cases = [
        (existing, "already exists.*--overwrite"),
        (tmp_path / "dir.safetensors", "is a folder"),
        (tmp_path / "file" / "r.safetensors", "cannot be written"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "r.safetensors", "cannot be written"))
    for out, message in cases:
        for args in (
            ["rollout", *common, "--out", str(out), "--engine", "hf", "--quiet"],
            [
                "convert",
                str(problems),
                "--tokenizer",
                str(tmp_path / "no-model"),
                "--out",
                str(out),
            ],
        ):
            result = _cli(args)
            assert result.exit_code == 2, (args, result.output)
            assert result.output.startswith("error:") and result.output.count("\n") == 1
            assert re.search(message, result.output), result.output
            assert "tokenizer" not in result.output
    assert existing.read_bytes() == b"hours of samples"
    # With --overwrite the check passes and the command goes on (to the missing model).
    result = _cli(["rollout", *common, "--out", str(existing), "--overwrite", "--engine", "hf"])
    assert result.exit_code == 2 and "cannot load tokenizer" in result.output
    deeper = tmp_path / "new" / "deeper" / "r.safetensors"
    result = _cli(["rollout", *common, "--out", str(deeper), "--engine", "hf"])
    assert result.exit_code == 2 and "cannot load tokenizer" in result.output
    assert not (tmp_path / "new").exists()  # the check creates nothing
    # An existing preview is output too.
    result = _cli(
        ["rollout", *common, "--out", str(tmp_path / "new.safetensors"), "--preview", str(existing)]
    )
    assert (
        result.exit_code == 2 and "--preview" in result.output and "already exists" in result.output
    )


def test_cli_rollout_overwrite_and_parts_folder(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    problems = _write_problems(tmp_path / "p.jsonl", PROBLEMS)
    out = tmp_path / "r.safetensors"
    args = ["rollout", "--model", str(model_dir), "--env", "math", "--problems", str(problems),
            "--out", str(out), "-n", "2", "--max-turns", "1", "--max-new-tokens", "4",
            "--engine", "hf", "--quiet", "--save-every", "1"]  # fmt: skip
    result = _cli(args)
    assert result.exit_code == 0, result.output
    first = load_rollouts(out)
    assert first.num_trajectories == 6 and not (tmp_path / "r.safetensors.partial").exists()
    result = _cli(args)
    assert result.exit_code == 2 and "already exists" in result.output
    result = _cli([*args, "--overwrite", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert load_rollouts(out).num_trajectories == 6
    result = _cli([*args[:-2], "--save-every", "0", "--overwrite"])
    assert result.exit_code == 2 and "--save-every" in result.output
