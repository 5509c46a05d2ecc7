"""drift-engine convert: the DRIFT reference's rollout JSONL into rollouts.safetensors."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from tokenizer_utils import make_chat_tokenizer

from drift_engine.cli import cli
from drift_engine.data.convert import convert_reference_jsonl
from drift_engine.data.rollouts import load_rollouts, validate_rollouts
from drift_engine.errors import DriftError, RolloutFormatError
from drift_engine.weighting import WeightingConfig, compute_returns, compute_weights

FEEDBACK = "Incorrect. Please think again."


def conversation(question, answers):
    messages = [
        {"role": "system", "content": "Answer in a box."},
        {"role": "user", "content": question},
    ]
    for k, answer in enumerate(answers):
        if k:
            messages.append({"role": "user", "content": FEEDBACK})
        messages.append({"role": "assistant", "content": answer})
    return messages


RECORDS = [
    {
        "prompt_id": "p0",
        "messages": conversation("What is 2+3?", ["the answer is 6", "the answer is 5"]),
        "turn_rewards": {"t1": 0.0, "t2": 1.0},
        "answer_norms": ["6", "5"],
        "format_penalty": 0.0,
        "verifier": "math",
        "t_star": 2,
    },
    {
        "prompt_id": "p1",
        "messages": conversation("Name a prime.", ["in the end: 7"]),
        "turn_rewards": {"t1": 1.0},
        "answer_norms": ["7"],
        "format_penalty": 0.0,
        "verifier": "math",
        "t_star": 1,
    },
    {
        "prompt_id": "p0",
        "messages": conversation("What is 2+3?", ["4", "hmm", "4"]),
        "turn_rewards": {"t1": 0, "t2": 0, "t3": 0},
        "answer_norms": ["4", None, "4"],
        "format_penalty": -0.1,
        "verifier": "math",
        "t_star": None,
    },
]


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_convert_tokens_turns_and_rewards(tmp_path):
    tok = make_chat_tokenizer()
    src = write_jsonl(tmp_path / "roll.jsonl", RECORDS)
    rs, report = convert_reference_jsonl(src, tok, reference_model="tiny-chat")
    assert rs.num_trajectories == 3 and report.num_groups == 2
    assert rs.group_ids.tolist() == [0, 1, 0]  # prompt ids in order of first appearance
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, record in enumerate(RECORDS):
        sl = rs.trajectory_slice(i)
        ids, turns = rs.input_ids[sl].tolist(), rs.turn_ids[sl].tolist()
        # Exactly the chat template's tokenisation.
        assert ids == tok.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
        # Each assistant turn's tokens decode to its content followed by the end-of-turn token.
        contents = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        for k, content in enumerate(contents, start=1):
            span = [t for t, turn in zip(ids, turns, strict=True) if turn == k]
            assert span[-1] == end
            assert tok.decode(span[:-1]) == content
        # Everything else (system, user, feedback, role headers, newlines) is context.
        n_assistant = sum(1 for t in turns if t > 0)
        assert n_assistant == sum(len(tok(c)["input_ids"]) + 1 for c in contents)
    assert rs.turn_rewards[0].tolist()[:2] == [0.0, 1.0] and math.isnan(rs.turn_rewards[0, 2])
    assert rs.turn_rewards[2].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(rs.format_penalty, torch.tensor([0.0, 0.0, -0.1]))
    # Repeat penalty: answers "4", "4" (None not counted): -0.5 * (1 - 1/2).
    torch.testing.assert_close(rs.repeat_penalty, torch.tensor([0.0, 0.0, -0.25]))
    assert rs.weights is None and rs.returns is None
    assert rs.metadata["reference_model"] == "tiny-chat" and rs.metadata["env"] == "math"
    assert rs.metadata["source"] == "roll.jsonl"
    validate_rollouts(rs, tokenizer=tok, train_turns="all")
    assert report.num_assistant_turns == 6 and report.num_tokens == rs.num_tokens
    assert "3 trajectories in 2 prompt groups" in report.summary()


def test_convert_with_weights(tmp_path):
    tok = make_chat_tokenizer()
    src = write_jsonl(tmp_path / "roll.jsonl", RECORDS)
    rs, _ = convert_reference_jsonl(src, tok, weighting=WeightingConfig(gamma=0.9, beta=0.1))
    want_r = compute_returns(rs.turn_rewards, 0.9, rs.format_penalty, rs.repeat_penalty)
    torch.testing.assert_close(rs.returns, want_r)
    torch.testing.assert_close(rs.returns, torch.tensor([0.9, 1.0, -0.35]))
    torch.testing.assert_close(rs.weights, compute_weights(want_r, rs.group_ids, 0.1))
    assert rs.metadata["gamma"] == "0.9" and rs.metadata["beta"] == "0.1"


def _with(record_index, **changes):
    records = [dict(r) for r in RECORDS]
    records[record_index].update(changes)
    for key, value in list(changes.items()):
        if value is ...:
            del records[record_index][key]
    return records


@pytest.mark.parametrize(
    "records, extra, message",
    [
        (_with(1, turn_rewards=...), (), r"roll.jsonl:2: missing field\(s\) \['turn_rewards'\]"),
        (RECORDS, ("{not json",), r"roll.jsonl:4: not valid JSON"),
        (RECORDS, ("[1, 2]",), r"roll.jsonl:4: expected a JSON object"),
        (
            _with(0, turn_rewards={"t1": 0.0}),
            (),
            r"roll.jsonl:1: turn_rewards must map \['t1', 't2'\]",
        ),
        (
            _with(0, turn_rewards={"t1": 0.0, "t2": "yes"}),
            (),
            r"turn_rewards\['t2'\] must be a number",
        ),
        (_with(2, answer_norms=["4"]), (), r"roll.jsonl:3: answer_norms must be a list"),
        (_with(1, format_penalty="none"), (), r"roll.jsonl:2: format_penalty must be a number"),
        (_with(0, messages=[]), (), r"roll.jsonl:1: messages must be a non-empty list"),
        (
            _with(
                1, messages=[{"role": "user", "content": "hi"}], turn_rewards={}, answer_norms=[]
            ),
            (),
            "no assistant message",
        ),
        ([], (), "holds no records"),
    ],
)
def test_convert_errors(tmp_path, records, extra, message):
    src = write_jsonl(tmp_path / "roll.jsonl", records, extra)
    with pytest.raises(RolloutFormatError, match=message):
        convert_reference_jsonl(src, make_chat_tokenizer())


def test_convert_refuses_template_problems(tmp_path):
    src = write_jsonl(tmp_path / "roll.jsonl", RECORDS)
    with pytest.raises(DriftError, match="no chat template"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=None))
    # A template that renders earlier assistant turns differently from the last one.
    rewriting = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' and not loop.last %}...{% else %}"
        "{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(RolloutFormatError, match="roll.jsonl:1: .*differently"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=rewriting))
    failing = "{{ raise_exception('bad conversation') }}"
    with pytest.raises(RolloutFormatError, match="chat template failed.*bad conversation"):
        convert_reference_jsonl(src, make_chat_tokenizer(chat_template=failing))


def test_cli_end_to_end(tmp_path):
    tok_dir = tmp_path / "tok"
    make_chat_tokenizer().save_pretrained(tok_dir)
    src = write_jsonl(tmp_path / "roll.jsonl", RECORDS)
    out = tmp_path / "out" / "rollouts.safetensors"
    runner = CliRunner()
    args = ["convert", str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--gamma", "0.9"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 trajectories in 2 prompt groups" in result.output
    rs = load_rollouts(out)
    direct, _ = convert_reference_jsonl(
        src, make_chat_tokenizer(), weighting=WeightingConfig(gamma=0.9)
    )
    assert torch.equal(rs.input_ids, direct.input_ids) and torch.equal(rs.turn_ids, direct.turn_ids)
    torch.testing.assert_close(rs.weights, direct.weights)
    assert rs.metadata["beta"] == "0.2" and rs.metadata["tokenizer_name"] == str(tok_dir)

    fresh = tmp_path / "fresh.safetensors"  # --out exists now: it would be refused first
    bad = write_jsonl(tmp_path / "bad.jsonl", RECORDS, ("{oops",))
    result = runner.invoke(
        cli, ["convert", str(bad), "--tokenizer", str(tok_dir), "--out", str(fresh)]
    )
    assert result.exit_code == 2
    assert "error: bad.jsonl:4: not valid JSON" in result.output
    result = runner.invoke(
        cli, ["convert", str(src), "--tokenizer", str(tmp_path / "none"), "--out", str(fresh)]
    )
    assert result.exit_code == 2 and "cannot load tokenizer" in result.output
    result = runner.invoke(
        cli, ["convert", str(src), "--tokenizer", str(tok_dir), "--out", str(fresh), "--beta", "0"]
    )
    assert result.exit_code == 2 and "beta must be > 0" in result.output
