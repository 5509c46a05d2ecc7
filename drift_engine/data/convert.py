"""Import the DRIFT reference implementation's rollout JSONL into a ``RolloutSet``.

One JSON object per line::

    {"prompt_id": 17,
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "turn_rewards": {"t1": 0.0, "t2": 1.0},
     "answer_norms": ["12", "7"],          # normalised answer per assistant turn, null if unparseable
     "format_penalty": -0.1,               # the signed return term
     "verifier": "math", "t_star": 2}      # optional, informational

Each conversation is tokenised exactly as ``tokenizer.apply_chat_template(messages,
tokenize=True)`` gives it. The k-th assistant message's tokens are the ones its message
adds after the generation prompt: tokens of ``apply_chat_template(messages[:m + 1])``
beyond ``apply_chat_template(messages[:m], add_generation_prompt=True)``, ending at the
turn's end-of-turn token (the tokenizer's eos) when the template appends scaffolding after
it. Both renderings must be prefixes of the full one; templates that re-render earlier
turns once later ones exist (for example by stripping reasoning) are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift_engine.data.rollouts import (
    META_ENV,
    META_REFERENCE_MODEL,
    RolloutSet,
    tokenizer_fingerprint,
    validate_rollouts,
)
from drift_engine.errors import DriftError, RolloutFormatError
from drift_engine.weighting import WeightingConfig, attach_weights, repeat_penalty_term

REQUIRED_FIELDS = ("prompt_id", "messages", "turn_rewards", "answer_norms", "format_penalty")
META_SOURCE = "source"


@dataclass(frozen=True)
class ConvertReport:
    num_trajectories: int
    num_groups: int
    num_tokens: int
    num_assistant_turns: int
    num_trained_tokens_last: int  # tokens of the last assistant turns
    num_trained_tokens_all: int  # tokens of all assistant turns

    def summary(self) -> str:
        return (
            f"{self.num_trajectories} trajectories in {self.num_groups} prompt groups, "
            f"{self.num_tokens} tokens, {self.num_assistant_turns} assistant turns "
            f"({self.num_trained_tokens_last} tokens in last turns, "
            f"{self.num_trained_tokens_all} in all turns)"
        )


def convert_reference_jsonl(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    weighting: WeightingConfig | None = None,
    reference_model: str | None = None,
) -> tuple[RolloutSet, ConvertReport]:
    """Read the reference JSONL at ``path`` into a validated ``RolloutSet``.

    Trajectories keep file order; group ids number the distinct ``prompt_id`` values in order
    of first appearance. With ``weighting``, returns and weights are computed and stored.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DriftError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; use the "
            "tokenizer of the chat model that produced the rollouts (its tokenizer_config.json "
            "or chat_template.jinja carries the template)"
        )
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RolloutFormatError(f"cannot read {str(path)!r}: {err}") from err

    eos_id = getattr(tokenizer, "eos_token_id", None)
    token_ids, turn_ids, group_ids, rewards, format_pen, repeat_pen = [], [], [], [], [], []
    group_of: dict[str, int] = {}
    verifiers: set[str] = set()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{line_no}"
        record = _parse_record(line, where)
        tokens, turns, n_assistant = _tokenise(record["messages"], tokenizer, eos_id, where)
        turn_rewards = _turn_rewards(record["turn_rewards"], n_assistant, where)
        answers = record["answer_norms"]
        if not isinstance(answers, list) or len(answers) != n_assistant:
            raise RolloutFormatError(
                f"{where}: answer_norms must be a list with one entry (string or null) per "
                f"assistant turn ({n_assistant}), got {answers!r}"
            )
        penalty = record["format_penalty"]
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
            raise RolloutFormatError(f"{where}: format_penalty must be a number, got {penalty!r}")
        key = json.dumps(record["prompt_id"], sort_keys=True)
        group_ids.append(group_of.setdefault(key, len(group_of)))
        token_ids.append(tokens)
        turn_ids.append(turns)
        rewards.append(turn_rewards)
        format_pen.append(float(penalty))
        repeat_pen.append(repeat_penalty_term([None if a is None else str(a) for a in answers]))
        if record.get("verifier") is not None:
            verifiers.add(str(record["verifier"]))
    if not token_ids:
        raise RolloutFormatError(f"{str(path)!r} holds no records (one JSON object per line)")

    metadata = {**tokenizer_fingerprint(tokenizer), META_SOURCE: path.name}
    if reference_model:
        metadata[META_REFERENCE_MODEL] = reference_model
    if len(verifiers) == 1:
        metadata[META_ENV] = verifiers.pop()
    rollouts = RolloutSet.from_trajectories(
        token_ids,
        turn_ids,
        group_ids,
        rewards,
        format_penalty=format_pen,
        repeat_penalty=repeat_pen,
        metadata=metadata,
    )
    if weighting is not None:
        rollouts = attach_weights(rollouts, weighting)
    validate_rollouts(rollouts, tokenizer=tokenizer)
    turns_t = rollouts.turn_ids
    report = ConvertReport(
        num_trajectories=rollouts.num_trajectories,
        num_groups=len(group_of),
        num_tokens=rollouts.num_tokens,
        num_assistant_turns=sum(len(r) for r in rewards),
        num_trained_tokens_last=int(rollouts.trained_mask("last").sum()),
        num_trained_tokens_all=int((turns_t > 0).sum()),
    )
    return rollouts, report


def _parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RolloutFormatError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno})"
        ) from err
    if not isinstance(record, dict):
        raise RolloutFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise RolloutFormatError(
            f"{where}: missing field(s) {missing}; each line needs {list(REQUIRED_FIELDS)}"
        )
    messages = record["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise RolloutFormatError(
            f"{where}: messages must be a non-empty list of {{'role': ..., 'content': ...}} objects"
        )
    return record


def _turn_rewards(raw: Any, n_assistant: int, where: str) -> list[float]:
    want = [f"t{k}" for k in range(1, n_assistant + 1)]
    if not isinstance(raw, dict) or sorted(raw, key=str) != sorted(want):
        got = sorted(raw) if isinstance(raw, dict) else raw
        raise RolloutFormatError(
            f"{where}: turn_rewards must map {want} (one reward per assistant turn), got {got!r}"
        )
    values = []
    for key in want:
        value = raw[key]
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise RolloutFormatError(
                f"{where}: turn_rewards[{key!r}] must be a number, got {value!r}"
            )
        values.append(float(value))
    return values


def _chat_ids(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool, where: str
) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    except Exception as err:  # Jinja errors and the template's own raise_exception calls
        raise RolloutFormatError(
            f"{where}: the chat template failed on this conversation: {err}"
        ) from err
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return list(out)


def _tokenise(
    messages: list[dict], tokenizer: Any, eos_id: int | None, where: str
) -> tuple[list[int], list[int], int]:
    """(token ids, turn ids, number of assistant turns) of one conversation."""
    full = _chat_ids(tokenizer, messages, False, where)
    turns = [0] * len(full)
    k = 0
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        k += 1
        before = _chat_ids(tokenizer, messages[:m], True, where) if m else []
        upto = _chat_ids(tokenizer, messages[: m + 1], False, where)
        for name, prefix in (("before", before), ("through", upto)):
            if full[: len(prefix)] != prefix:
                raise RolloutFormatError(
                    f"{where}: the chat template renders the conversation {name} assistant "
                    f"turn {k} differently from the full conversation, so turn boundaries "
                    "cannot be found by prefix tokenisation (templates that rewrite earlier "
                    "turns, e.g. by dropping reasoning, are not supported)"
                )
        start, end = len(before), len(upto)
        # Scaffolding the template adds after the end-of-turn token (e.g. a newline) was
        # not produced by the policy: keep it as context.
        if eos_id is not None and eos_id in full[start:end]:
            end = start + max(i for i, t in enumerate(full[start:end]) if t == eos_id) + 1
        if end <= start:
            raise RolloutFormatError(
                f"{where}: assistant turn {k} adds no tokens after the generation prompt"
            )
        turns[start:end] = [k] * (end - start)
    if k == 0:
        raise RolloutFormatError(f"{where}: the conversation has no assistant message")
    return full, turns, k
