"""drift-engine convert: the DRIFT reference's rollout JSONL into rollouts.safetensors.

The input files are written by ``drift_reference.generate_records``, the reference
generator's record-building logic with a scripted policy; the weights are checked against
``drift_reference.reference_weights``, weight_sft.py's arithmetic on the same rows.
"""

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from drift_reference import (
    Args,
    generate_records,
    normalize_answer,
    reference_returns,
    reference_weights,
)
from tokenizer_utils import make_chat_tokenizer

from drift_engine.cli import cli
from drift_engine.convert import convert_reference_jsonl, reference_repeat_penalty
from drift_engine.data.rollouts import load_rollouts, validate_rollouts
from drift_engine.errors import DriftError, RolloutFormatError
from drift_engine.weighting import WeightingConfig

ROWS = [json.loads(line) for line in generate_records(num_prompts=5, n=4, seed=0)]


def n_assistant(row):
    return sum(1 for m in row["messages"] if m["role"] == "assistant")


def find(predicate):
    return next(i for i, row in enumerate(ROWS) if predicate(row))


SOLVED_EARLY = find(lambda r: r["t_star"] is not None and 1 < r["t_star"] < 5)
UNSOLVED = find(lambda r: r["t_star"] is None)


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fixture_has_what_the_reference_writes():
    """The generated rows cover early stopping, turns without actions and multi-action turns."""
    turns = [n_assistant(r) for r in ROWS]
    assert all(len(r["turn_rewards"]) == len(r["verifier"]) == 5 for r in ROWS)
    assert any(r["t_star"] is not None and r["t_star"] < 5 for r in ROWS)  # stopped when solved
    assert any(
        r["t_star"] is None and n < 5 for r, n in zip(ROWS, turns, strict=True)
    )  # ran out of actions
    assert any(
        len(r["answer_norms"]) < n for r, n in zip(ROWS, turns, strict=True)
    )  # a format failure
    assert any(
        len(r["answer_norms"]) > n for r, n in zip(ROWS, turns, strict=True)
    )  # several actions a turn
    assert any(r["format_penalty"] < 0 for r in ROWS)
    assert any(reference_repeat_penalty(r["answer_norms"]) < 0 for r in ROWS)


def test_reference_file_converts(tmp_path):
    tok = make_chat_tokenizer()
    src = write_jsonl(tmp_path / "roll.jsonl", ROWS)
    rs, report = convert_reference_jsonl(src, tok, reference_model="tiny-chat")
    assert rs.num_trajectories == len(ROWS) and report.num_groups == 5
    assert rs.group_ids.tolist() == [i // 4 for i in range(len(ROWS))]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(ROWS):
        sl = rs.trajectory_slice(i)
        ids, turns = rs.input_ids[sl].tolist(), rs.turn_ids[sl].tolist()
        # Exactly the chat template's tokenisation.
        assert ids == tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        # Each assistant turn's tokens decode to its content followed by the end-of-turn token.
        contents = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        for k, content in enumerate(contents, start=1):
            span = [t for t, turn in zip(ids, turns, strict=True) if turn == k]
            assert span[-1] == end
            assert tok.decode(span[:-1]) == content
        # Rewards of the turns taken; the zeros padded up to max_turns are dropped.
        n = len(contents)
        want = [row["turn_rewards"][f"t{k}"] for k in range(1, n + 1)]
        assert rs.turn_rewards[i, :n].tolist() == want
        assert all(math.isnan(x) for x in rs.turn_rewards[i, n:].tolist())
        assert rs.format_penalty[i] == torch.tensor(row["format_penalty"], dtype=torch.float32)
        assert rs.repeat_penalty[i] == torch.tensor(
            reference_repeat_penalty(row["answer_norms"]), dtype=torch.float32
        )
    assert rs.weights is None and rs.returns is None
    assert rs.metadata["reference_model"] == "tiny-chat" and rs.metadata["source"] == "roll.jsonl"
    assert json.loads(rs.metadata["sampling"]) == {"max_turns": 5}
    validate_rollouts(rs, tokenizer=tok, train_turns="all")
    assert report.num_assistant_turns == sum(n_assistant(r) for r in ROWS)
    solved = [r["t_star"] for r in ROWS if r["t_star"] is not None]
    assert sum(report.solved_at) == len(solved) and report.num_with_t_star == len(ROWS)
    assert report.solved_at[0] == solved.count(1)
    assert f"solved {len(solved)} of {len(ROWS)}" in report.summary()


@pytest.mark.parametrize("gamma, beta", [(0.7, 0.2), (0.9, 0.05), (1.0, 1.0), (0.0, 0.3)])
def test_weights_equal_weight_sft(tmp_path, gamma, beta):
    rows = copy.deepcopy(ROWS)
    # Cases the reference's generator does not produce but weight_sft.py defines: an integer
    # prompt id grouped with its string form, empty/null answers (counted in the denominator
    # only), a large format penalty (weights far apart).
    rows[0]["prompt_id"] = 7
    rows[1]["prompt_id"] = "7"
    for i, answers in ((2, ["", "3", "3"]), (3, [None, None])):
        rows[i]["answer_norms"] = answers
        del rows[i]["reward_details"]
    rows[5]["format_penalty"] = -3.0
    del rows[5]["reward_details"]
    src = write_jsonl(tmp_path / "roll.jsonl", rows)
    rs, _ = convert_reference_jsonl(
        src, make_chat_tokenizer(), weighting=WeightingConfig(gamma=gamma, beta=beta)
    )
    want_w = torch.tensor(reference_weights(rows, gamma, beta), dtype=torch.float64)
    want_r = torch.tensor(reference_returns(rows, gamma), dtype=torch.float64)
    # float32 storage of float64 values computed the same way: equal to the last bit (the
    # reference's 1e-12 in the group mean and the summation order are below float32's ulp).
    torch.testing.assert_close(rs.weights, want_w.float(), rtol=2**-23, atol=0)
    torch.testing.assert_close(rs.returns, want_r.float(), rtol=2**-23, atol=1e-12)
    assert rs.group_ids[0] == rs.group_ids[1]
    assert len(set(rs.group_ids.tolist())) == 6
    assert rs.metadata["gamma"] == repr(gamma) and rs.metadata["beta"] == repr(beta)


def test_reference_repeat_penalty_is_weight_sft():
    assert reference_repeat_penalty([]) == 0.0
    assert reference_repeat_penalty(["1", "2"]) == 0.0
    assert reference_repeat_penalty(["4", "4", "4", "4"]) == pytest.approx(-0.5 * (1 - 1 / 4))
    assert reference_repeat_penalty(["4", None, ""]) == pytest.approx(-0.5 * (1 - 1 / 3))
    assert normalize_answer(" A  b\n") == "ab"


def _mutated(index, **changes):
    rows = copy.deepcopy(ROWS)
    for key, value in changes.items():
        if value is ...:
            del rows[index][key]
        elif callable(value):
            value(rows[index])
        else:
            rows[index][key] = value
    return rows


def _set(path, value):
    def apply(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


_E, _U = SOLVED_EARLY, UNSOLVED
_LINE_E, _LINE_U = f"roll.jsonl:{_E + 1}: ", f"roll.jsonl:{_U + 1}: "
_N_E = n_assistant(ROWS[_E])


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (_mutated(_E, turn_rewards=...), (), _LINE_E + r"missing field\(s\) \['turn_rewards'\]"),
        (ROWS, ("{not json",), rf"roll.jsonl:{len(ROWS) + 1}: not valid JSON"),
        (ROWS, ("[1, 2]",), rf"roll.jsonl:{len(ROWS) + 1}: expected a JSON object"),
        (
            _mutated(_E, turn_rewards={f"t{k}": 0.0 for k in range(1, _N_E)}),
            (),
            _LINE_E + rf"turn_rewards covers turns t1..t{_N_E - 1} but the conversation has "
            rf"{_N_E} assistant turns",
        ),
        (
            _mutated(_E, turn_rewards={"t1": 0.0, "t3": 0.0}),
            (),
            _LINE_E + "turn_rewards must map 't1', 't2', ... 'tM'",
        ),
        (
            _mutated(_E, turn_rewards=_set(["turn_rewards", "t5"], 1.0)),
            (),
            _LINE_E + r"turn_rewards\['t5'\] is 1.0 but the conversation has only",
        ),
        (
            _mutated(_E, turn_rewards=_set(["turn_rewards", "t1"], "yes")),
            (),
            _LINE_E + r"turn_rewards\['t1'\] must be a finite number",
        ),
        (
            _mutated(_E, turn_rewards=_set(["turn_rewards", "t1"], math.nan)),
            (),
            _LINE_E + r"turn_rewards\['t1'\] must be a finite number, got nan",
        ),
        (_mutated(_E, verifier="math"), (), _LINE_E + "verifier must map 't1'"),
        (
            _mutated(_E, verifier={f"t{k}": 0 for k in range(1, 7)}),
            (),
            _LINE_E + "verifier covers turns t1..t6 but turn_rewards covers t1..t5",
        ),
        (
            _mutated(_E, verifier=_set(["verifier", "t1"], 2)),
            (),
            _LINE_E + "verifier values must be 0 or 1",
        ),
        (
            _mutated(_E, verifier=_set(["verifier", "t1"], 1)),
            (),
            _LINE_E + r"verifier marks turn\(s\) \[1, \d\] correct",
        ),
        (_mutated(_E, t_star=1), (), _LINE_E + "t_star is 1 in a conversation of"),
        (
            _mutated(_U, t_star=n_assistant(ROWS[_U])),
            (),
            _LINE_U + r"t_star is \d but the verifier marks no turn",
        ),
        (_mutated(_E, answer_norms="7"), (), _LINE_E + "answer_norms must be a list of strings"),
        (_mutated(_E, answer_norms=[7]), (), _LINE_E + "answer_norms must be a list of strings"),
        (
            _mutated(_E, format_penalty="none"),
            (),
            _LINE_E + "format_penalty must be a finite number",
        ),
        (
            _mutated(_E, reward_details=_set(["reward_details", "t1", "env_reward"], 0.5)),
            (),
            _LINE_E + r"reward_details\['t1'\]\['env_reward'\] is 0.5 but",
        ),
        (
            _mutated(_E, format_penalty=-0.7),
            (),
            _LINE_E + "format_penalty is -0.7 but the turns' format penalties",
        ),
        (
            _mutated(_E, answer_norms=["x"] * 9),
            (),
            _LINE_E + "answer_norms .* are not the normalised actions",
        ),
        (
            _mutated(_E, reward_details=_set(["reward_details", "t9"], {})),
            (),
            _LINE_E + "reward_details must map",
        ),
        (
            _mutated(_E, messages=lambda r: r["messages"].append({"role": "user", "content": "?"})),
            (),
            _LINE_E + "the conversation ends with a 'user' message",
        ),
        (_mutated(_E, messages=[]), (), _LINE_E + "messages must be a non-empty list"),
        (_mutated(_E, prompt_id=""), (), _LINE_E + "prompt_id must be a non-empty string"),
        (_mutated(_E, prompt_id=None), (), _LINE_E + "prompt_id must be a non-empty string"),
        (_mutated(_E, gold=12), (), _LINE_E + "gold must be a string"),
        ([], (), "holds no records"),
    ],
)
def test_convert_refuses_what_the_reference_cannot_write(tmp_path, rows, extra, message):
    src = write_jsonl(tmp_path / "roll.jsonl", rows, extra)
    with pytest.raises(RolloutFormatError, match=message):
        convert_reference_jsonl(src, make_chat_tokenizer())


def test_optional_fields_may_be_absent(tmp_path):
    rows = copy.deepcopy(ROWS[:4])
    for row in rows:
        for key in ("gold", "verifier", "reward_details", "t_star"):
            del row[key]
    rs, report = convert_reference_jsonl(
        write_jsonl(tmp_path / "r.jsonl", rows), make_chat_tokenizer()
    )
    assert rs.num_trajectories == 4 and report.num_with_t_star == 0
    assert "solved" not in report.summary()


def test_convert_refuses_template_problems(tmp_path):
    src = write_jsonl(tmp_path / "roll.jsonl", ROWS[:2])
    with pytest.raises(DriftError, match="no chat template"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=None))
    # A template that renders earlier assistant turns differently from the last one.
    rewriting = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' and not loop.last %}...{% else %}"
        "{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    multi = find(lambda r: n_assistant(r) > 1)
    src = write_jsonl(tmp_path / "roll.jsonl", [ROWS[multi]])
    with pytest.raises(RolloutFormatError, match="roll.jsonl:1: .*differently"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=rewriting))
    failing = "{{ raise_exception('bad conversation') }}"
    with pytest.raises(RolloutFormatError, match="chat template failed.*bad conversation"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=failing))


def make_chat_model_dir(path):
    """A tiny random Qwen2 (the trainer tests' shape) over the chat tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = make_chat_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_converts_and_trains(tmp_path):
    model = make_chat_model_dir(tmp_path / "model")
    rows = [json.loads(x) for x in generate_records(3, 4, seed=1, args=Args(prompt_mode="simple"))]
    assert any(r["t_star"] is not None and r["t_star"] < 5 for r in rows)
    src = write_jsonl(tmp_path / "roll.jsonl", rows)
    out = tmp_path / "out" / "rollouts.safetensors"
    runner = CliRunner()
    args = ["convert", str(src), "--tokenizer", str(model), "--out", str(out), "--gamma", "0.9"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"{len(rows)} trajectories in 3 prompt groups" in result.output
    rs = load_rollouts(out)
    torch.testing.assert_close(
        rs.weights, torch.tensor(reference_weights(rows, 0.9, 0.2)), rtol=2**-23, atol=0
    )
    assert rs.metadata["beta"] == "0.2" and rs.metadata["tokenizer_name"] == str(model)

    run = tmp_path / "run"
    result = runner.invoke(
        cli,
        ["train", "--data", str(out), "--model", str(model), "--out", str(run),
         "--max-steps", "2", "--batch-tokens", "1024", "--lr", "1e-3", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_cli_errors_are_one_line(tmp_path):
    tok_dir = tmp_path / "tok"
    make_chat_tokenizer().save_pretrained(tok_dir)
    fresh = tmp_path / "fresh.safetensors"
    runner = CliRunner()
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2], ("{oops",))
    result = runner.invoke(
        cli, ["convert", str(bad), "--tokenizer", str(tok_dir), "--out", str(fresh)]
    )
    assert result.exit_code == 2
    assert "error: bad.jsonl:3: not valid JSON" in result.output
    src = write_jsonl(tmp_path / "roll.jsonl", ROWS[:2])
    result = runner.invoke(
        cli, ["convert", str(src), "--tokenizer", str(tmp_path / "none"), "--out", str(fresh)]
    )
    assert result.exit_code == 2 and "cannot load tokenizer" in result.output
    result = runner.invoke(
        cli, ["convert", str(src), "--tokenizer", str(tok_dir), "--out", str(fresh), "--beta", "0"]
    )
    assert result.exit_code == 2 and "beta must be > 0" in result.output
